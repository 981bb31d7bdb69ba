"""``cached_weights(model)``: dequantize every quantized weight once, for evaluation loops.

A quantized module's reference forward unpacks and dequantizes its weight on every call. An evaluation
(perplexity over many batches, a sweep of layer errors) runs the same weights many times; inside

    with cached_weights(model):
        for batch in batches:
            model(batch)

each :class:`~lowbit.nn.base.QuantModule` dequantizes once per (dtype, device) and reuses the tensor: the
same numbers as the uncached forward, bit for bit. The cache is a per-instance attribute set here and
removed on exit (also when the block raises), so nothing changes for the class or for other models.
Memory: one float copy of every quantized weight per dtype in use, for the duration of the block.
The storage must not be changed inside the block except through ``set_quantized_weight`` or ``.to()``,
which clear the module's cache.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from lowbit.nn.base import CACHE_ATTR, QuantModule


@contextmanager
def cached_weights(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every quantized module of ``model`` reuses its dequantized weight; yields ``model``.

    Nested blocks share the outer block's caches; each removes only the caches it created.
    """
    created = []
    try:
        for m in model.modules():
            if isinstance(m, QuantModule) and CACHE_ATTR not in m.__dict__:
                object.__setattr__(m, CACHE_ATTR, {})
                created.append(m)
        yield model
    finally:
        for m in created:
            m.__dict__.pop(CACHE_ATTR, None)

"""The fingerprint of a calibration run: short digests of everything its result depends on.

:class:`~lowbit.calibration.checkpoint.BlockCheckpoint` keys its folder with them, so that blocks are
reused only by a run that would compute them again bit for bit: same lowbit and torch versions, same plan,
same calibration data, same model weights. (Not the torch thread count: the results do not depend on it,
see ``lowbit.algorithms.gptq._inverse_cholesky``.)
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.version import __version__


def run_key(model: nn.Module, plan: dict[str, Any], data: Any) -> dict[str, str]:
    """What a calibration run's result depends on, as short digests (:class:`BlockCheckpoint`'s ``parts``).

    Hashes every tensor of ``model.state_dict()`` (name, dtype, shape, bytes: one read of the weights,
    540 MB for a 135M-parameter fp32 model) and every batch of ``data`` (tensors by dtype, shape and bytes; dicts, lists, tuples and plain scalars
    by structure).

    Raises:
        InputError: ``data`` is a one-shot iterator (it would be used up here) or holds other objects.
    """
    from lowbit.calibration.capture import batches

    if isinstance(data, Iterator):
        raise InputError("resuming (checkpoint=) needs calibration data that can be read twice: a tensor, a "
                         f"list/tuple of batches or a re-iterable data set, not a one-shot {type(data).__name__}")
    state = hashlib.sha256(type(model).__qualname__.encode())
    for name, t in model.state_dict().items():
        _feed(state, name)
        _feed(state, t)
    feed = hashlib.sha256()
    for b in batches(data):
        _feed(feed, b)
    return {
        "versions": f"lowbit {__version__}, torch {torch.__version__}",
        "plan": hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest(),
        "calibration data": feed.hexdigest(),
        "model": state.hexdigest(),
    }


def _feed(h: Any, x: Any) -> None:
    """Add ``x`` to the hash ``h``, tagged with its type and structure so different inputs cannot collide."""
    if isinstance(x, torch.Tensor):
        h.update(f"T{x.dtype}{tuple(x.shape)}".encode())
        if x.device.type != "meta":  # bytes of any dtype (bf16 has no numpy twin): a uint8 view, no copy
            h.update(x.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    elif isinstance(x, dict):
        h.update(f"D{len(x)}".encode())
        for k, v in x.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(x, (list, tuple)):
        h.update(f"L{len(x)}".encode())
        for v in x:
            _feed(h, v)
    elif x is None or isinstance(x, (bool, int, float, str)):
        h.update(repr((type(x).__name__, x)).encode() + b";")
    else:
        raise InputError(f"resuming (checkpoint=) cannot fingerprint a {type(x).__name__} in the calibration "
                         "data; pass tensors (or dicts, lists, tuples of them), or checkpoint=None")

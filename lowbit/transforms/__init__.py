"""Equivalence transforms: rewrite a float model into one with the same outputs (up to float rounding)
before quantization, so that its weights and activations quantize better.

``quantize()`` applies the plan's ``transforms`` (recipe key ``transforms: [fuse_norms]``) in order, right
after checking the model and before choosing the layers to quantize, and puts the float model back if
quantization then fails. Each transform is ``f(model, originals) -> model``: it changes ``model`` in place
and calls ``originals.keep(module, key)`` before it changes a tensor, so :meth:`Originals.restore` can undo it
exactly. The transformed weights are ordinary model state: ``lowbit.save`` writes them and ``lowbit.load``
reads them back with no extra manifest key.

| name         | what it does                                                                     |
|--------------|----------------------------------------------------------------------------------|
| `fuse_norms` | each RMSNorm/LayerNorm's gain (and LayerNorm's bias) moved into the linears it feeds |
| (`hadamard`) | building block, not a transform yet: Hadamard matrices, fast `hadamard_transform`, random rotations |
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.transforms.fuse_norms import fuse_norms
from lowbit.transforms.hadamard import hadamard_transform

# the names recipes may list under ``transforms:``
TRANSFORMS: dict[str, Callable[..., nn.Module]] = {"fuse_norms": fuse_norms}


class Originals:
    """The tensors transforms changed, as they were before (on the CPU), to put back with :meth:`restore`."""

    def __init__(self) -> None:
        self._slots: dict[tuple[int, str], tuple[nn.Module, str, torch.Tensor | None]] = {}

    def keep(self, module: nn.Module, key: str) -> None:
        """Remember parameter or buffer ``key`` of ``module`` (None if it has none); the first call wins."""
        t = getattr(module, key, None)
        saved = None if t is None else t.detach().to("cpu", copy=True)
        self._slots.setdefault((id(module), key), (module, key, saved))

    def restore(self) -> None:
        """Put every kept tensor back, bit for bit; a tensor that did not exist (a created bias) is removed."""
        with torch.no_grad():
            for module, key, saved in reversed(list(self._slots.values())):
                current = getattr(module, key, None)
                if saved is None:
                    setattr(module, key, None)
                elif current is None:
                    setattr(module, key, nn.Parameter(saved, requires_grad=False))
                else:
                    current.data = saved.to(current.device)

    def __len__(self) -> int:
        return len(self._slots)


def check_transforms(names: Iterable[str], where: str = "plan") -> tuple[str, ...]:
    """``names`` as a tuple, each checked to be a known transform; InputError listing the known ones."""
    if isinstance(names, str):
        raise InputError(f"{where}: transforms must be a list of names, got the string {names!r}; "
                         f"write [{names}]")
    names = tuple(names)
    for n in names:
        if n not in TRANSFORMS:
            raise InputError(f"{where}: unknown transform {n!r}; known: {', '.join(TRANSFORMS)}")
    return names


def apply_transforms(model: nn.Module, names: Iterable[str]) -> Originals:
    """Apply the transforms ``names`` to ``model`` in order; return what they changed, for undo.

    If one raises, the ones before it are undone first: the model is left as it came.
    """
    originals = Originals()
    try:
        for n in check_transforms(names):
            TRANSFORMS[n](model, originals)
    except BaseException:
        originals.restore()
        raise
    return originals


__all__ = ["TRANSFORMS", "Originals", "apply_transforms", "check_transforms", "fuse_norms",
           "hadamard_transform"]

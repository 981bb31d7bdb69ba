"""Equivalence transforms: rewrite a float model into one with the same outputs (up to float rounding)
before quantization, so that its weights and activations quantize better.

``quantize()`` applies the plan's ``transforms`` (recipe key ``transforms: [fuse_norms]``) in order, right
after checking the model and before choosing the layers to quantize, and puts the float model back if
quantization then fails. Each transform is ``f(model, originals) -> model``: it changes ``model`` in place
and calls ``originals.keep(module, key)`` before it changes a tensor, so :meth:`Originals.restore` can undo it
exactly (``keep_object`` for a replaced module or an untied parameter). Transforms in ``NEEDS_DATA`` also take
``data=`` (the calibration batches), ``plan=`` and ``progress=`` keywords. The transformed weights are ordinary
model state that ``lowbit.save`` writes; what a transform changes in the model's *structure* (a bias a linear
did not have, an untied head, a linear that rotates its input online) ``lowbit.load`` rebuilds from the plan
recorded in the manifest with the transform's entry in ``REBUILD``, before it reads the weights.

| name              | what it does                                                                          |
|-------------------|---------------------------------------------------------------------------------------|
| `fuse_norms`      | each RMSNorm/LayerNorm's gain (and LayerNorm's bias) moved into the linears it feeds    |
| `rotate_residual` | the residual stream rotated offline by a randomized Hadamard (QuaRot); no run-time cost |
| `rotate`          | `rotate_residual` plus online Hadamards on the o_proj and down_proj inputs (QuaRot)     |
| `rotate_inputs`   | an online Hadamard on the input of every linear in the blocks (any architecture)        |
| `smoothquant`     | activation outliers moved into the weights by per-channel scales, alpha searched per block (needs data) |
| `awq_scales`      | AWQ's activation-aware scales, shared by each norm's linears and folded into the norm (needs data) |
| `fold_batchnorm`  | each BatchNorm folded into the convolution or linear before it                         |
| `equalize`        | BatchNorms folded, then cross-layer equalization of consecutive layer pairs (DFQ)      |
| `absorb_bias`     | BatchNorms folded, then high-bias absorption into the next layer's bias (DFQ)          |

Scaling transforms (``smoothquant``, ``awq_scales``) come after ``fuse_norms`` and any rotation: those would fuse
the scaled norm gains back into the weights.

The Hadamard math (matrices, the fast transform, random rotations) is in ``lowbit.hadamard``; the rotations
in ``lowbit.transforms.rotate``.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.hadamard import hadamard_transform
from lowbit.transforms.bias_absorption import absorb_bias
from lowbit.transforms.equalization import equalize, fold_batchnorm, rebuild_fold_batchnorm
from lowbit.transforms.fuse_norms import fuse_norms, rebuild_fuse_norms
from lowbit.transforms.rotate import (
    rebuild_rotate,
    rebuild_rotate_inputs,
    rebuild_rotate_residual,
    rotate,
    rotate_inputs,
    rotate_residual,
)
from lowbit.transforms.smooth import awq_scales, smoothquant

log = logging.getLogger(__name__)

# the names recipes may list under ``transforms:``
TRANSFORMS: dict[str, Callable[..., nn.Module]] = {
    "fuse_norms": fuse_norms,
    "rotate_residual": rotate_residual,
    "rotate": rotate,
    "rotate_inputs": rotate_inputs,
    "smoothquant": smoothquant,
    "awq_scales": awq_scales,
    "fold_batchnorm": fold_batchnorm,
    "equalize": equalize,
    "absorb_bias": absorb_bias,
}
NEEDS_DATA = ("smoothquant", "awq_scales")
# per transform: (float architecture, the saved state's keys) -> None, restoring what it changed in the structure
REBUILD: dict[str, Callable[[nn.Module, set[str]], None]] = {
    "fuse_norms": rebuild_fuse_norms,
    "rotate_residual": rebuild_rotate_residual,
    "rotate": rebuild_rotate,
    "rotate_inputs": rebuild_rotate_inputs,
    "smoothquant": lambda model, keys: None,  # scales only: weights and gains, no structure
    "awq_scales": lambda model, keys: None,
    "fold_batchnorm": rebuild_fold_batchnorm,
    "equalize": rebuild_fold_batchnorm,
    "absorb_bias": rebuild_fold_batchnorm,
}
_ROTATIONS = ("rotate_residual", "rotate", "rotate_inputs")
_SCALINGS = ("smoothquant", "awq_scales")


class Originals:
    """The tensors transforms changed, as they were before (on the CPU), to put back with :meth:`restore`."""

    def __init__(self) -> None:
        # (id(owner), attribute) -> (owner, attribute, saved value, kept by object); an offloaded tensor's saved
        # value is its key in the file
        self._slots: dict[tuple[int, str], tuple[Any, str, Any, bool]] = {}
        self._file: Path | None = None
        self._offloaded: set[tuple[int, str]] = set()

    def keep(self, module: nn.Module, key: str) -> None:
        """Remember parameter or buffer ``key`` of ``module`` (None if it has none); the first call wins."""
        t = getattr(module, key, None)
        saved = None if t is None else t.detach().to("cpu", copy=True)
        self._slots.setdefault((id(module), key), (module, key, saved, False))

    def keep_object(self, owner: Any, attr: str) -> None:
        """Remember the object ``owner.attr`` itself (a child module about to be replaced, a parameter about
        to be untied, a config value): :meth:`restore` sets it back. The first call for ``(owner, attr)`` wins."""
        self._slots.setdefault((id(owner), attr), (owner, attr, getattr(owner, attr), True))

    def absorb(self, other: "Originals") -> None:
        """Take over ``other``'s slots (those this one already holds keep the older value)."""
        for k, v in other._slots.items():
            self._slots.setdefault(k, v)

    def restore(self) -> None:
        """Put every kept tensor back, bit for bit; a tensor that did not exist (a created bias) is removed;
        objects kept with :meth:`keep_object` are set back."""
        self._read_back()
        with torch.no_grad():
            for module, key, saved, by_object in reversed(list(self._slots.values())):
                if by_object:
                    setattr(module, key, saved)
                    continue
                current = getattr(module, key, None)
                if saved is None:
                    setattr(module, key, None)
                elif current is None:
                    setattr(module, key, nn.Parameter(saved, requires_grad=False))
                elif current.shape == saved.shape and current.dtype == saved.dtype:
                    current.data.copy_(saved)  # in place: through a view, the tensor it views is restored too
                else:
                    current.data = saved.to(current.device)

    def offload(self) -> None:
        """Move the kept tensors to a temporary safetensors file (in a ``lowbit-undo-*`` folder, see
        ``lowbit.calibration.undo``) so that undo costs no memory while quantization runs; :meth:`restore`
        reads them back, :meth:`close` deletes the file. Where the file cannot be written they stay in memory."""
        from safetensors.torch import save_file

        from lowbit.calibration.undo import _new_folder

        tensors = {f"t{i}": saved.contiguous() for i, (k, (_, _, saved, by_object)) in enumerate(self._slots.items())
                   if not by_object and isinstance(saved, torch.Tensor) and saved.numel()}
        if not tensors:
            return
        try:
            folder = _new_folder()
            self._file = folder / "transforms.safetensors"
            save_file(tensors, str(self._file))
        except OSError as e:
            log.warning("cannot write the tensors the transforms changed to a temporary file (%s); they stay in "
                        "memory until quantize() returns", e)
            self._file = None
            return
        for i, (k, (owner, attr, saved, by_object)) in enumerate(list(self._slots.items())):
            if f"t{i}" in tensors:
                self._slots[k] = (owner, attr, f"t{i}", False)
                self._offloaded.add(k)

    def _read_back(self) -> None:
        if not self._offloaded or self._file is None:
            return
        from safetensors import safe_open

        with safe_open(str(self._file), framework="pt") as f:
            for k in self._offloaded:
                owner, attr, name, by_object = self._slots[k]
                self._slots[k] = (owner, attr, f.get_tensor(name), by_object)
        self._offloaded.clear()

    def close(self) -> None:
        """Delete the temporary file of :meth:`offload` (the undo is no longer possible afterwards)."""
        if self._file is not None:
            shutil.rmtree(self._file.parent, ignore_errors=True)
            self._file = None

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
    rotations = [n for n in names if n in _ROTATIONS]
    if len(rotations) > 1:
        raise InputError(f"{where}: at most one rotation transform, got {rotations}")
    if rotations and "fuse_norms" in names and names.index("fuse_norms") > names.index(rotations[0]):
        raise InputError(f"{where}: fuse_norms must come before {rotations[0]} (which runs it itself anyway)")
    for scaling in _SCALINGS:
        if scaling not in names:
            continue
        later = [n for n in names[names.index(scaling) + 1:] if n == "fuse_norms" or n in _ROTATIONS]
        if later:
            raise InputError(f"{where}: {later[0]} after {scaling} would fuse the scaled norm gains back into the "
                             f"weights; list {scaling} after it")
    if all(s in names for s in _SCALINGS):
        raise InputError(f"{where}: smoothquant and awq_scales both rescale the same channels; pick one")
    return names


def apply_transforms(model: nn.Module, names: Iterable[str], *, data: Any = None, plan: Any = None,
                     progress: bool = False) -> Originals:
    """Apply the transforms ``names`` to ``model`` in order; return what they changed, for undo.

    ``data``, ``plan`` and ``progress`` go to the transforms that need them (``NEEDS_DATA``). If one raises,
    the ones before it are undone first: the model is left as it came.
    """
    originals = Originals()
    try:
        for n in check_transforms(names):
            if n in NEEDS_DATA:
                TRANSFORMS[n](model, originals, data=data, plan=plan, progress=progress)
            else:
                TRANSFORMS[n](model, originals)
    except BaseException:
        originals.restore()
        raise
    return originals


def rebuild_structure(model: nn.Module, names: Iterable[str], keys: set[str]) -> None:
    """Give a freshly built float architecture (real or ``meta``) the structure that the transforms ``names``
    gave the model saved with state ``keys`` (``lowbit.load`` calls this before reading the weights)."""
    for n in check_transforms(names, "the saved plan"):
        REBUILD[n](model, keys)


__all__ = ["REBUILD", "TRANSFORMS", "NEEDS_DATA", "Originals", "absorb_bias", "apply_transforms", "awq_scales",
           "check_transforms", "equalize", "fold_batchnorm", "fuse_norms", "hadamard_transform", "rebuild_structure",
           "rotate", "rotate_inputs", "rotate_residual", "smoothquant"]

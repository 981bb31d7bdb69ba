"""``load(path, model=None)``: rebuild a model saved by ``lowbit.save``, bit-exactly, after verifying it.

Order: read and check the manifest -> check every listed file's size and SHA-256 -> read the tensors
-> take the float architecture (``model`` if given, else ``lowbit.models.build_skeleton(manifest["source"])``)
-> build an empty quantized module (``from_layer_record``) for each recorded name and check that the
model's state keys and shapes will then match the file exactly -> only now change the model: swap the
modules in, ``load_state_dict(strict=True, assign=True)`` (tensors keep the dtypes they were saved in),
re-tie shared tensors -> eval mode. Tensors are read with ``safetensors.torch.load_file``; nothing is
unpickled.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

import lowbit
from lowbit.errors import CorruptFileError, InputError
from lowbit.io.manifest import MANIFEST, WEIGHTS, read_manifest, verify_files
from lowbit.nn.base import QuantModule
from lowbit.nn.conv import QuantConv1d, QuantConv2d
from lowbit.nn.convert import float_weight, from_layer_record, is_quantizable
from lowbit.nn.embedding import QuantEmbedding

log = logging.getLogger(__name__)

# the float module kind each quantized module stands in for (anything else quantizable is a linear)
_FLOAT_KIND = {QuantEmbedding: nn.Embedding, QuantConv2d: nn.Conv2d, QuantConv1d: nn.Conv1d}


def load(path: str | os.PathLike, model: nn.Module | None = None) -> nn.Module:
    """The model saved at ``path``, on the CPU, in eval mode.

    Args:
        path: a folder written by ``lowbit.save``.
        model: the float model of the saved architecture, used as the skeleton (changed in place and
            returned). Needed when the artifact records no ``source``; its weights are replaced. Every
            check runs before it is touched, so a refused artifact leaves it as it was.
    Raises:
        InputError: ``path`` is missing or not a folder; no ``source`` and no ``model``; the model does not
            have the saved architecture (a module missing, another kind or shape, state keys differ).
        CorruptFileError: not a lowbit artifact, a bad manifest, or a file missing, truncated or changed.
    """
    folder = Path(path).expanduser()
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    if manifest["lowbit_version"] != lowbit.__version__:
        log.debug("%s was written by lowbit %s (this is %s)", folder, manifest["lowbit_version"], lowbit.__version__)
    state = _read_state(folder, manifest)
    root = model if model is not None else _skeleton(folder, manifest)
    layers = _build_layers(root, manifest, folder)
    _check_state(root, layers, state, folder)
    for name, qm in layers.items():
        if name == "":
            root = qm  # the whole model was one quantized layer
        else:
            root.set_submodule(name, qm)
    try:
        # assign: take the saved tensors themselves, so every dtype is kept exactly as saved
        root.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise InputError(f"the state in {folder} does not fit the model: {e}") from None
    _retie(root, manifest["tied_tensors"])
    return root.eval()


def _skeleton(folder: Path, manifest: dict[str, Any]) -> nn.Module:
    source = manifest["source"]
    if source is None:
        raise InputError(f"{folder} records no model source (saved without source=); pass the float model of "
                         f"its architecture: lowbit.load(path, model=...)")
    from lowbit.models import build_skeleton  # lazy: loaders pull in transformers

    try:
        return build_skeleton(source)
    except InputError as e:
        raise InputError(f"{folder}: cannot rebuild the architecture from its recorded source ({e}); "
                         f"pass the float model with lowbit.load(path, model=...)") from None


def _build_layers(root: nn.Module, manifest: dict[str, Any], folder: Path) -> dict[str, QuantModule]:
    """Module path -> empty quantized module to put there (a shared module under each of its paths)."""
    modules = dict(root.named_modules(remove_duplicate=False))
    aliases: dict[str, list[str]] = {}
    for alias, first in manifest["shared_modules"].items():
        aliases.setdefault(first, []).append(alias)
    out: dict[str, QuantModule] = {}
    for name, rec in manifest["layers"].items():
        try:
            qm = from_layer_record(rec)
        except (InputError, KeyError, TypeError, ValueError) as e:
            raise CorruptFileError(f"{folder / MANIFEST}: layer {name!r} has a bad record ({e})") from None
        for p in [name, *aliases.get(name, [])]:
            _check_fits(p, modules.get(p), qm, folder)
            out[p] = qm
    return out


def _check_fits(name: str, target: nn.Module | None, qm: QuantModule, folder: Path) -> None:
    """The model's module at ``name`` must be the float (or quantized) twin of ``qm``: same kind and shape."""
    where = f"{folder} stores a {type(qm).__name__} {qm.weight_shape} at {name!r}"
    if target is None:
        raise InputError(f"{where} but the model has no such module; pass the architecture it was saved from")
    if isinstance(target, QuantModule):
        kind_ok, shape = type(target) is type(qm), target.weight_shape
    elif is_quantizable(target):
        want = _FLOAT_KIND.get(type(qm))
        kind_ok = isinstance(target, want) if want else not isinstance(target, tuple(_FLOAT_KIND.values()))
        shape = tuple(float_weight(target).shape)
    else:
        kind_ok, shape = False, None
    if not kind_ok:
        raise InputError(f"{where} but the model has a {type(target).__name__} there; "
                         f"pass the architecture it was saved from")
    if shape != qm.weight_shape:
        raise InputError(f"{where} but the model's {type(target).__name__} there has weight {shape}; "
                         f"pass the architecture (and size) it was saved from")


def _read_state(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The file's tensors plus every tied key pointing at its canonical tensor."""
    f = folder / WEIGHTS
    try:
        state = safetensors.torch.load_file(f)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{f}: not a readable safetensors file ({e})") from None
    for alias, canon in manifest["tied_tensors"].items():
        if canon not in state or alias in state:
            raise CorruptFileError(f"{folder / MANIFEST}: tied tensor {alias!r} -> {canon!r} does not match {f}")
        state[alias] = state[canon]
    return state


def _check_state(root: nn.Module, layers: dict[str, QuantModule], state: dict[str, torch.Tensor],
                 folder: Path) -> None:
    """The keys and shapes ``root`` will have once ``layers`` are in place must be exactly ``state``'s."""
    expected = {k: tuple(t.shape) for k, t in root.state_dict().items() if not _under(k, layers)}
    for p, qm in layers.items():
        expected.update({(f"{p}.{k}" if p else k): tuple(t.shape) for k, t in qm.state_dict().items()})
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"the state in {folder} does not fit the model: {len(missing)} key(s) missing from the file "
            f"{missing[:5]}, {len(unexpected)} not in the model {unexpected[:5]}; pass the architecture it was "
            f"saved from"
        )
    wrong = [f"{k}: file {tuple(state[k].shape)}, model {s}" for k, s in expected.items() if tuple(state[k].shape) != s]
    if wrong:
        raise InputError(f"the state in {folder} does not fit the model: {len(wrong)} shape(s) differ "
                         f"({'; '.join(wrong[:5])}); pass the architecture (and size) it was saved from")


def _under(key: str, paths: dict[str, Any]) -> bool:
    """True when state ``key`` belongs to a module at one of ``paths`` (or below it)."""
    if "" in paths:
        return True
    parts = key.split(".")
    return any(".".join(parts[:i]) in paths for i in range(1, len(parts)))


def _retie(root: nn.Module, tied: dict[str, str]) -> None:
    """Make each tied key the very same Parameter/buffer object as its canonical key, as when saved."""
    for alias, canon in tied.items():
        (a_mod, a_leaf), (c_mod, c_leaf) = _owner(root, alias), _owner(root, canon)
        for table in ("_parameters", "_buffers"):
            a_tab, c_tab = getattr(a_mod, table), getattr(c_mod, table)
            if a_leaf in a_tab and c_leaf in c_tab:
                a_tab[a_leaf] = c_tab[c_leaf]


def _owner(root: nn.Module, key: str) -> tuple[nn.Module, str]:
    prefix, _, leaf = key.rpartition(".")
    return (root.get_submodule(prefix) if prefix else root), leaf

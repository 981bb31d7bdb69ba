"""``save(model, path)``: write a quantized model as a folder of safetensors + a JSON manifest, atomically.

The folder (see ``lowbit.io.manifest`` for every manifest key)::

    path/
      manifest.json       format, versions, source, plan, layer records, ties, file checksums, sizes
      model.safetensors   the full state dict: packed uint8 codes, scales in their storage dtype,
                          zero points, float parameters of unquantized layers; each storage once

Nothing is pickled. The folder appears complete or not at all (``lowbit.atomic``).

What may be at ``path`` already:

* nothing, or an empty folder: written.
* a lowbit artifact: replaced only with ``overwrite=True`` (and only if it holds nothing but the files
  its manifest lists); otherwise an InputError.
* anything else (a file, a device or fifo, a symbolic link, a folder with other files): an InputError, even
  with ``overwrite=True``. Replacing means deleting, and lowbit deletes only what it wrote.

``check_destination`` also refuses a path that is empty, not UTF-8 (safetensors opens UTF-8 paths only),
inside what is being read, or under a folder where nothing can be created (tried for real: read-only
mounts), before any work is done; an OSError while writing becomes an InputError (``lowbit.atomic``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lowbit.atomic import atomic_folder
from lowbit.errors import InputError
from lowbit.io.manifest import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, file_entry, read_manifest
from lowbit.nn.convert import layer_record
from lowbit.nn.hf_classes import source_of
from lowbit.nn.input_quant import INPUTS_ATTR
from lowbit.nn.state import CALIBRATION_ATTR, distinct_tensors, for_safetensors, quantized_modules, state_tensors
from lowbit.paths import check_outside, check_writable, kind, output_path
from lowbit.plan import QuantPlan
from lowbit.spec import QuantSpec
from lowbit.version import __version__

log = logging.getLogger(__name__)


def save(
    model: nn.Module,
    path: str | os.PathLike,
    *,
    source: dict[str, Any] | None = None,
    plan: QuantPlan | QuantSpec | str | None = None,
    extra: dict[str, Any] | None = None,
    overwrite: bool = False,
    float_dtype: torch.dtype | str | None = None,
) -> Path:
    """Write ``model`` (usually after ``lowbit.quantize``) to the folder ``path``; return its absolute path.

    Args:
        model: any ``nn.Module``; its quantized layers are recorded so ``load`` can rebuild them.
        path: the output folder (parents are created). See the module docstring for what may exist there.
        source: the loader's source dict (``LoadedModel.source``), which lets ``load`` rebuild the
            architecture without being given a model. None: for a transformers model of a class lowbit can
            rebuild by name, its class and config are recorded (``lowbit.nn.hf_classes.source_of``); for
            any other module nothing, and ``load`` will need ``model=``.
        plan: the plan the model was quantized with (recorded for reference; a spec or scheme name is
            taken as a uniform plan).
        extra: any JSON-able dict to keep in the manifest.
        overwrite: replace an existing lowbit artifact at ``path``.
        float_dtype: ``float16`` or ``bfloat16``: write the float tensors outside quantized layers (embeddings,
            norms, a float head) in it, as the source model stored them (``lowbit quantize`` passes the source
            folder's dtype), where that is exact: a tensor that does not round-trip (changed by a transform)
            stays as it is. ``load`` widens them back to the model's compute dtype, so outputs are unchanged.
            None: every tensor as it is in memory.
    Raises:
        InputError: ``path`` is taken (see above), an argument is not JSON-able, or the model's state holds
            something other than tensors. Nothing is written then, and a failure while writing leaves no
            partial folder and the previous artifact (if any) untouched.
    """
    if not isinstance(model, nn.Module):
        raise InputError(f"save() needs an nn.Module, got {type(model).__name__}")
    released = [n for n, m in model.named_modules() if getattr(m, "storage_released", False)]
    if released:
        more = f" and {len(released) - 1} more" if len(released) > 1 else ""
        raise InputError(f"cannot save: {released[0]}{more} handed its weight storage to a "
                         f"kernel (use_kernels(..., keep_reference=False)); save before packing, or load again")
    dest = check_destination(path, overwrite)
    if source is None:
        source = source_of(model)
        if source is None:
            log.info("%s records no model source (%s is no transformers class lowbit rebuilds by name): "
                     "lowbit.load will need model=", dest, type(model).__name__)
    calibration = model.__dict__.get(CALIBRATION_ATTR)
    if calibration is not None and "calibration" not in (extra or {}):
        extra = {**(extra or {}), "calibration": calibration}
    inputs = model.__dict__.get(INPUTS_ATTR)  # quantized inputs of modules without weights (lowbit.nn.input_quant)
    if inputs and "inputs" not in (extra or {}):
        extra = {**(extra or {}), "inputs": inputs}
    canonical, tied = distinct_tensors(state_tensors(model))
    manifest = _manifest(model, tied, source, plan, extra)
    if float_dtype is not None:
        canonical, narrowed = _narrow_floats(model, canonical, float_dtype)
        if narrowed:
            manifest["float_storage"] = {"dtype": str(narrowed[0][1]).removeprefix("torch."),
                                         "tensors": [k for k, _ in narrowed]}
    tensors = _tensors(canonical)
    with atomic_folder(dest) as tmp:  # creates missing parents; an OSError becomes an InputError
        # looked up at call time (not imported by name) so tests can make the writer fail. One metadata key
        # only: safetensors writes __metadata__ from a hash map, so two keys come out in either order and the
        # same tensors would not always give the same bytes
        try:
            safetensors.torch.save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        except safetensors.SafetensorError as e:  # its I/O errors (read-only, disk full) are not OSErrors:
            raise OSError(str(e)) from e  # make them one, so atomic_folder reports them as a write failure
        manifest["files"] = {WEIGHTS: file_entry(tmp / WEIGHTS)}
        with open(tmp / MANIFEST, "w", encoding="utf-8") as fh:
            fh.write(_to_json(_ordered(manifest), "the manifest", indent=2) + "\n")
    log.info("saved %d quantized layer(s), %d tensor(s), %d bytes to %s", len(manifest["layers"]), len(tensors),
             manifest["files"][WEIGHTS]["bytes"], dest)
    return dest


def _narrow_floats(model: nn.Module, canonical: dict[str, torch.Tensor], dtype: torch.dtype | str
                   ) -> tuple[dict[str, torch.Tensor], list[tuple[str, torch.dtype]]]:
    """``canonical`` with the wider float tensors outside quantized layers cast to ``dtype`` where the cast is
    exact, and the keys cast (with ``dtype``)."""
    from lowbit.io.manifest import FLOAT_STORAGE_DTYPES

    name = str(dtype).removeprefix("torch.")
    if name not in FLOAT_STORAGE_DTYPES:
        raise InputError(f"save(): float_dtype must be one of {', '.join(FLOAT_STORAGE_DTYPES)}, got {dtype!r}")
    dt = getattr(torch, name)
    quantized = tuple(f"{n}." for n in quantized_modules(model)[0])
    out, narrowed, inexact = dict(canonical), [], []
    for key, t in canonical.items():
        if (not t.is_floating_point() or t.element_size() <= dt.itemsize or key.startswith(quantized)
                or t.device.type == "meta"):
            continue
        n = t.to(dt)
        if torch.equal(n.to(t.dtype), t):
            out[key] = n
            narrowed.append((key, dt))
        else:
            inexact.append(key)
    if inexact:
        log.info("%d float tensor(s) are not exactly %s (a transform changed them) and are written as they are: %s",
                 len(inexact), name, ", ".join(inexact[:3]) + (" ..." if len(inexact) > 3 else ""))
    return out, narrowed


def _manifest(model: nn.Module, tied: dict[str, str], source: Any, plan: Any, extra: Any) -> dict[str, Any]:
    """Every manifest key except ``files``, checked JSON-able before anything is written."""
    from lowbit.nn.size import model_size

    for what, value in (("source", source), ("extra", extra)):
        if value is not None and not isinstance(value, dict):
            raise InputError(f"save(): {what} must be a dict or None, got {type(value).__name__}")
        _to_json(value, f"save(): {what}")
    if isinstance(plan, (str, QuantSpec)):
        plan = QuantPlan.uniform(plan)
    if plan is not None and not isinstance(plan, QuantPlan):
        raise InputError(f"save(): plan must be a QuantPlan (or a scheme name), got {type(plan).__name__}")
    layers, shared = quantized_modules(model)
    m = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "lowbit_version": __version__,
        "source": None if source is None else json.loads(_to_json(source, "save(): source")),
        "plan": None if plan is None else plan.to_dict(),
        "extra": None if extra is None else json.loads(_to_json(extra, "save(): extra")),
        "layers": {name: layer_record(qm) for name, qm in layers.items()},
        "shared_modules": shared,
        "tied_tensors": tied,
        "size": model_size(model).to_dict(),
    }
    _to_json(m, "the manifest")
    return m


def _tensors(canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors to write: distinct storages only, CPU, contiguous."""
    for key, t in canonical.items():
        if t.device.type == "meta":
            raise InputError(f"state entry {key!r} is on the meta device (no data); materialize the model first")
    return for_safetensors(canonical)


def check_destination(path: str | os.PathLike, overwrite: bool, *, file: bool = False,
                      inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """Raise InputError unless ``path`` may be written; return it as an absolute path.

    The one check of an output path, made before any long work (``lowbit quantize`` calls it before loading
    the model) and again when writing. ``file=False``: an artifact folder (see the module docstring).
    ``file=True``: one file (an export): an existing regular file is replaced only with ``overwrite``; a
    folder, a device, a fifo or a symbolic link never. Either way the path must be UTF-8, must not be or lie
    inside one of ``inputs`` (what is being read), and the nearest existing folder above it must be writable.
    """
    dest = output_path(path)
    for src in inputs:
        check_outside(dest, Path(src))
    if dest.is_symlink():
        raise InputError(f"{dest} is a symbolic link; pass the {'file' if file else 'folder'} it points to, "
                         f"or a new path")
    if dest.exists():
        (_check_file_target if file else _check_folder_target)(dest, overwrite)
    check_writable(dest)
    return dest


def _check_folder_target(dest: Path, overwrite: bool) -> None:
    """An existing path given for an artifact folder: see the module docstring."""
    if not dest.is_dir():
        if dest.is_file():
            raise InputError(f"{dest} exists and is a file; pass a folder path for the artifact")
        raise InputError(f"{dest} is {kind(dest)}, not a folder; pass a new folder path for the artifact")
    with contextlib.suppress(OSError):
        cwd = Path.cwd()
        if cwd == dest or dest in cwd.parents:
            raise InputError(f"{dest} is the current folder or holds it; lowbit replaces its output folder by "
                             f"renaming, which would pull the folder out from under this process: pass a path "
                             f"for a new folder")
    entries = sorted(p.name for p in dest.iterdir())
    if not entries:
        return
    try:
        listed = {MANIFEST, *read_manifest(dest)["files"]}
    except InputError:
        listed = None
    if listed is None:
        shown = ", ".join(entries[:5]) + (" ..." if len(entries) > 5 else "")
        raise InputError(f"{dest} is a folder with other files ({shown}) and not a lowbit artifact; lowbit will "
                         f"not replace it (even with overwrite=True); choose a new or empty folder")
    if not overwrite:
        raise InputError(f"{dest} already holds a lowbit artifact; pass overwrite=True (lowbit quantize "
                         f"--overwrite) to replace it, or choose another folder")
    foreign = [e for e in entries if e not in listed]
    if foreign:
        raise InputError(f"{dest} holds a lowbit artifact plus files lowbit did not write ({', '.join(foreign[:5])});"
                         f" move them away before overwriting, or choose another folder")


def _check_file_target(dest: Path, overwrite: bool) -> None:
    """An existing path given for one output file."""
    if dest.is_dir():
        raise InputError(f"{dest} is a folder; give a file path inside it (e.g. {dest / 'model'}.EXT)")
    if not dest.is_file():  # replacing /dev/null or a fifo by a regular file would break whatever uses it
        raise InputError(f"{dest} is {kind(dest)}, not a regular file; lowbit will not replace it (even with "
                         f"overwrite=True): give a path for a new file")
    if not overwrite:
        raise InputError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it")


def _to_json(value: Any, what: str, indent: int | None = None) -> str:
    try:
        return json.dumps(value, allow_nan=False, indent=indent)
    except (TypeError, ValueError) as e:
        raise InputError(f"{what} is not JSON-serializable: {e}") from None


def _ordered(m: dict[str, Any]) -> dict[str, Any]:
    """Manifest keys in a reading order: identity, provenance, checksums, sizes, then the long tables."""
    order = ("format", "format_version", "lowbit_version", "files", "size", "source", "plan", "extra",
             "float_storage", "tied_tensors", "shared_modules", "layers")
    return {k: m[k] for k in order if k in m}

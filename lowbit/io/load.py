"""``load(path, model=None)``: rebuild a model saved by ``lowbit.save``, bit-exactly, after verifying it.

Everything is checked before anything sizeable is allocated or any other file is opened:

1. the manifest (``read_manifest``): size, JSON, keys, every layer record against its schema;
2. every listed file: a regular file in the folder (no symbolic link), its size and SHA-256;
3. the safetensors header alone (names, dtypes, shapes; no tensor data read);
4. the architecture on the ``meta`` device (``model``'s own modules if given, else
   ``lowbit.models.build_skeleton(manifest["source"])`` built on ``meta``) with an empty quantized module
   (``from_layer_record``, also on ``meta``) at each recorded name: every state key, shape and dtype must
   match the header exactly (quantized storage dtypes exactly, float tensors any float dtype), and the
   float architecture may take at most :func:`arch_bytes_bound` (the weights file times 16, the widest
   ratio of fp32 to a packed 2-bit weight, plus 256 MiB);
5. only now: read the tensors, build the real architecture, swap the quantized modules in, and
   ``load_state_dict(strict=True, assign=True)`` (tensors keep the dtypes they were saved in), re-tie
   shared tensors, eval mode.

So a damaged or hostile artifact is refused by a :class:`CorruptFileError` / :class:`InputError` before
memory follows its claims, and load allocates at most the file's tensors plus the architecture that step 4
bounded. Tensors are read with ``safetensors``; nothing is unpickled.
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

from lowbit.errors import CorruptFileError, InputError
from lowbit.io.manifest import MANIFEST, WEIGHTS, read_manifest, verify_files
from lowbit.nn.base import STORAGE_BUFFERS, QuantModule
from lowbit.nn.conv import QuantConv1d, QuantConv2d
from lowbit.nn.convert import float_weight, from_layer_record, is_quantizable
from lowbit.nn.embedding import QuantEmbedding
from lowbit.nn.input_quant import attach_input_quant, check_input_record
from lowbit.nn.kv_cache import attach_kv_quant
from lowbit.spec import KVCacheQuant
from lowbit.version import __version__

log = logging.getLogger(__name__)

# the float module kind each quantized module stands in for (anything else quantizable is a linear)
_FLOAT_KIND = {QuantEmbedding: nn.Embedding, QuantConv2d: nn.Conv2d, QuantConv1d: nn.Conv1d}
# safetensors' dtype names (the header's "dtype" field)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# config keys that count repeated blocks: more blocks than the file has tensors cannot be this artifact
_DEPTH_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "encoder_layers", "decoder_layers")
ARCH_SLACK = 256 * 2**20


def arch_bytes_bound(file_bytes: int) -> int:
    """The most bytes the float architecture of an artifact whose weights file has ``file_bytes`` may take."""
    return 16 * file_bytes + ARCH_SLACK


Header = dict[str, tuple[tuple[int, ...], torch.dtype]]


def load(path: str | os.PathLike, model: nn.Module | None = None, *, trust_remote_code: bool = False) -> nn.Module:
    """The model saved at ``path``, on the CPU, in eval mode.

    Args:
        path: a folder written by ``lowbit.save``.
        model: the float model of the saved architecture, used as the skeleton (changed in place and
            returned). Needed when the artifact records no ``source``; its weights are replaced. Every
            check runs before it is touched, so a refused artifact leaves it as it was.
        trust_remote_code: let a recorded source whose model class is its folder's own code (``auto_map``)
            run that code to rebuild the architecture; refused otherwise.
    Raises:
        InputError: ``path`` is missing or not a folder; no ``source`` and no ``model``; the model does not
            have the saved architecture (a module missing, another kind or shape, state keys differ).
        CorruptFileError: not a lowbit artifact, a bad manifest, a file missing, truncated, changed or not a
            regular file, or tensors whose names, shapes or dtypes do not fit the recorded layers.
    """
    from lowbit.models.hf import remote_code, remote_code_trusted  # lazy: transformers is imported on use only

    with remote_code(trust_remote_code or remote_code_trusted()):
        return _load(Path(path).expanduser(), model)


def _load(folder: Path, model: nn.Module | None) -> nn.Module:
    manifest = read_manifest(folder)
    verify_files(folder, manifest)
    if manifest["lowbit_version"] != __version__:
        log.debug("%s was written by lowbit %s (this is %s)", folder, manifest["lowbit_version"], __version__)
    header = _read_header(folder, manifest)
    # what the manifest describes, built and checked on meta tensors: nothing is allocated whatever it claims
    arch = model if model is not None else _skeleton(folder, manifest, header, meta=True)
    _rebuild_transforms(arch, manifest, header, folder)
    layers = _build_layers(arch, manifest, folder)
    _check_state(arch, layers, header, folder)
    inputs = _input_record(arch, manifest, folder)
    if model is None:
        _check_arch_bytes(arch, folder)
    state = _read_state(folder, manifest)
    if model is None:
        root = _skeleton(folder, manifest, header, meta=False)
        _rebuild_transforms(root, manifest, header, folder)
    else:
        root = model
    for name, qm in layers.items():
        if name == "":
            root = qm  # the whole model was one quantized layer
        else:
            root.set_submodule(name, qm)
    try:
        # assign: take the saved tensors themselves (dtypes exactly as saved); the quantized modules were
        # built on meta, so every one of their tensors comes from the file
        root.load_state_dict(state, strict=True, assign=True)
    except RuntimeError as e:
        raise InputError(f"the state in {folder} does not fit the model: {e}") from None
    _widen(root, manifest, folder)
    _retie(root, manifest["tied_tensors"])
    _attach_kv(root, manifest, folder)
    if inputs is not None:
        attach_input_quant(root, inputs)
    left = [k for k, t in root.state_dict().items() if t.is_meta]
    if left:  # cannot happen after the key check above; a guard against a module with unsaved state
        raise CorruptFileError(f"{folder}: {len(left)} tensor(s) got no data from the file ({left[:3]})")
    return root.eval()


def _skeleton(folder: Path, manifest: dict[str, Any], header: Header, meta: bool) -> nn.Module:
    """The float architecture the manifest's ``source`` records, on ``meta`` or for real (CPU)."""
    source = manifest["source"]
    if source is None:
        raise InputError(f"{folder} records no model source (saved without source=); pass the float model of "
                         f"its architecture: lowbit.load(path, model=...)")
    from lowbit.models import build_skeleton  # lazy: loaders pull in transformers

    _check_depth(source, len(header), folder)
    try:
        with torch.device("meta" if meta else "cpu"):
            return build_skeleton(source)
    except InputError as e:
        raise InputError(f"{folder}: cannot rebuild the architecture from its recorded source ({e}); "
                         f"pass the float model with lowbit.load(path, model=...)") from None
    except Exception as e:  # noqa: BLE001 - a damaged config can fail anywhere inside a model's constructor
        raise CorruptFileError(f"{folder / MANIFEST}: its source does not build a model ({type(e).__name__}: "
                               f"{e}); the manifest is damaged, or pass the float model with "
                               f"lowbit.load(path, model=...)") from None


def _input_record(arch: nn.Module, manifest: dict[str, Any], folder: Path) -> dict | None:
    """The quantized inputs of modules without weights the manifest records (``lowbit.nn.input_quant``), checked
    against the architecture, or None."""
    extra = manifest.get("extra")
    record = extra.get("inputs") if isinstance(extra, dict) else None
    if record is None:
        return None
    try:
        check_input_record(arch, record)
    except CorruptFileError as e:
        raise CorruptFileError(f"{folder / MANIFEST}: extra.inputs: {e}") from None
    return record


def _attach_kv(model: nn.Module, manifest: dict[str, Any], folder: Path) -> None:
    """Quantize the KV cache again as the saved plan says (``lowbit.nn.kv_cache``)."""
    plan = manifest["plan"]
    kv = plan.get("kv") if isinstance(plan, dict) else None
    if kv is None:
        return
    try:
        attach_kv_quant(model, KVCacheQuant.from_dict(kv))
    except InputError as e:
        raise CorruptFileError(f"{folder / MANIFEST}: plan.kv {kv!r} cannot be applied ({e})") from None


def _rebuild_transforms(arch: nn.Module, manifest: dict[str, Any], header: Header, folder: Path) -> None:
    """Give ``arch`` the structure quantization gave the saved model: fused mixture-of-experts weights as one
    linear pair per expert (``lowbit.nn.experts``), then what the plan's transforms changed
    (``lowbit.transforms.REBUILD``): biases fused norms created, an untied head, linears that rotate their
    input online."""
    from lowbit.nn.experts import rebuild_experts

    rebuild_experts(arch, set(header))  # fused experts saved as one linear pair per expert
    plan = manifest["plan"]
    names = plan.get("transforms") if isinstance(plan, dict) else None
    if not names:
        return
    from lowbit.transforms import rebuild_structure  # lazy: transforms reach the architecture tables

    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise CorruptFileError(f"{folder / MANIFEST}: plan.transforms must be a list of names, got {names!r}")
    keys = set(header)  # tensors stored under their own name; tied aliases (manifest "tied_tensors") are not
    try:
        rebuild_structure(arch, names, keys)
    except InputError as e:
        raise InputError(f"{folder}: cannot rebuild the structure its transforms {names} gave the model ({e}); "
                         f"pass the float model it was made from with lowbit.load(path, model=...)") from None


def _check_depth(source: Any, n_tensors: int, folder: Path) -> None:
    """A recorded config may not claim more repeated blocks than the file has tensors (each block has some):
    building a million empty blocks would take minutes and gigabytes before any shape could disagree."""
    config = source.get("config") if isinstance(source, dict) else None
    if not isinstance(config, dict):
        return
    for part in (config, config.get("text_config"), config.get("vision_config")):
        if not isinstance(part, dict):
            continue
        for key in _DEPTH_KEYS:
            v = part.get(key)
            if isinstance(v, bool) or (v is not None and not isinstance(v, int)) or (
                    isinstance(v, int) and not 0 <= v <= n_tensors):
                raise CorruptFileError(f"{folder / MANIFEST}: source config {key}={v!r} does not fit the "
                                       f"{n_tensors} tensor(s) of {WEIGHTS}; the manifest is damaged")


def _check_arch_bytes(arch: nn.Module, folder: Path) -> None:
    """The float architecture (on meta) must fit :func:`arch_bytes_bound` before it is built for real."""
    seen, total = set(), 0
    for t in (*arch.parameters(), *arch.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    file_bytes = (folder / WEIGHTS).stat().st_size
    if total > arch_bytes_bound(file_bytes):
        raise CorruptFileError(f"{folder / MANIFEST}: its source describes a float model of {total / 2**20:.0f} MiB, "
                               f"more than a {file_bytes / 2**20:.1f} MiB artifact can hold "
                               f"(bound: 16 x the file + 256 MiB); the manifest is damaged")


def _build_layers(root: nn.Module, manifest: dict[str, Any], folder: Path) -> dict[str, QuantModule]:
    """Module path -> empty quantized module to put there (a shared module under each of its paths)."""
    modules = dict(root.named_modules(remove_duplicate=False))
    aliases: dict[str, list[str]] = {}
    for alias, first in manifest["shared_modules"].items():
        aliases.setdefault(first, []).append(alias)
    out: dict[str, QuantModule] = {}
    for name, rec in manifest["layers"].items():
        try:
            with torch.device("meta"):  # shapes and dtypes only: the file's tensors are assigned later
                qm = from_layer_record(rec)
        except (InputError, KeyError, TypeError, ValueError, RuntimeError) as e:
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


def _read_header(folder: Path, manifest: dict[str, Any]) -> Header:
    """Name -> (shape, dtype) of every tensor in the weights file, tied aliases included; no data read."""
    f = folder / WEIGHTS
    try:
        with safetensors.safe_open(str(f), framework="pt") as st:
            raw = {k: (st.get_slice(k).get_shape(), st.get_slice(k).get_dtype()) for k in st.keys()}
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{f}: not a readable safetensors file ({e})") from None
    header: Header = {}
    for k, (shape, dtype) in raw.items():
        if dtype not in _DTYPES:
            raise CorruptFileError(f"{f}: tensor {k!r} has dtype {dtype}, which lowbit never writes")
        header[k] = (tuple(int(d) for d in shape), _DTYPES[dtype])
    for alias, canon in manifest["tied_tensors"].items():
        if canon not in header or alias in header:
            raise CorruptFileError(f"{folder / MANIFEST}: tied tensor {alias!r} -> {canon!r} does not match {f}")
        header[alias] = header[canon]
    return header


def _read_state(folder: Path, manifest: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The file's tensors plus every tied key pointing at its canonical tensor (the header was checked)."""
    f = folder / WEIGHTS
    try:
        state = safetensors.torch.load_file(f)
    except (safetensors.SafetensorError, OSError, ValueError) as e:
        raise CorruptFileError(f"{f}: not a readable safetensors file ({e})") from None
    for alias, canon in manifest["tied_tensors"].items():
        state[alias] = state[canon]
    return state


def _check_state(root: nn.Module, layers: dict[str, QuantModule], header: Header, folder: Path) -> None:
    """The keys, shapes and dtypes ``root`` will have once ``layers`` are in place must be the file's.

    A quantized module's storage (codes, scales, zero points, ...) must have exactly the dtype its record
    implies: the same bytes read as another dtype are other numbers. Other floating tensors may be any float
    dtype (a model saved in bf16 stays bf16); integer and boolean tensors keep their dtype.
    """
    expected = {k: t for k, t in root.state_dict().items() if not _under(k, layers)}
    storage = set()
    for p, qm in layers.items():
        for k, t in qm.state_dict().items():
            key = f"{p}.{k}" if p else k
            expected[key] = t
            if k in STORAGE_BUFFERS:
                storage.add(key)
    missing, unexpected = sorted(set(expected) - set(header)), sorted(set(header) - set(expected))
    if missing or unexpected:
        raise InputError(
            f"the state in {folder} does not fit the model: {len(missing)} key(s) missing from the file "
            f"{missing[:5]}, {len(unexpected)} not in the model {unexpected[:5]}; pass the architecture it was "
            f"saved from"
        )
    wrong = [f"{k}: file {header[k][0]}, model {tuple(t.shape)}" for k, t in expected.items()
             if header[k][0] != tuple(t.shape)]
    if wrong:
        raise InputError(f"the state in {folder} does not fit the model: {len(wrong)} shape(s) differ "
                         f"({'; '.join(wrong[:5])}); pass the architecture (and size) it was saved from")
    bad = [f"{k}: file {header[k][1]}, expected {t.dtype}" for k, t in expected.items()
           if not _dtype_ok(header[k][1], t.dtype, k in storage)]
    if bad:
        raise CorruptFileError(f"{folder / WEIGHTS}: {len(bad)} tensor(s) have a dtype their layer records do not "
                               f"allow ({'; '.join(bad[:5])}); the file was modified after saving")


def _dtype_ok(got: torch.dtype, want: torch.dtype, exact: bool) -> bool:
    if exact or not want.is_floating_point:
        return got == want
    return got.is_floating_point and got.itemsize >= 2  # fp16, bf16, fp32, fp64; not fp8 reinterpretations


def _under(key: str, paths: dict[str, Any]) -> bool:
    """True when state ``key`` belongs to a module at one of ``paths`` (or below it)."""
    if "" in paths:
        return True
    parts = key.split(".")
    return any(".".join(parts[:i]) in paths for i in range(1, len(parts)))


def _widen(root: nn.Module, manifest: dict[str, Any], folder: Path) -> None:
    """Float tensors ``save(float_dtype=...)`` wrote narrower (manifest ``float_storage``) back in the dtype the
    model computes in (float32: lowbit loads and quantizes models in float32)."""
    storage = manifest.get("float_storage")
    if not storage:
        return
    state = dict(root.state_dict(keep_vars=True))
    missing = [k for k in storage["tensors"] if k not in state]
    if missing:
        raise CorruptFileError(f"{folder / MANIFEST}: float_storage names {len(missing)} tensor(s) the model does "
                               f"not have ({missing[:3]})")
    with torch.no_grad():
        for key in storage["tensors"]:
            owner, leaf = _owner(root, key)
            t = state[key]
            wide = t.detach().to(torch.float32)
            if leaf in owner._parameters:
                owner._parameters[leaf] = nn.Parameter(wide, requires_grad=t.requires_grad)
            else:
                owner._buffers[leaf] = wide


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

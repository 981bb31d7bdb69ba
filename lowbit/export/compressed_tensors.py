"""``lowbit export --format compressed-tensors``: a lowbit model written as a compressed-tensors ``pack-quantized``
folder (the layout, and reading it back: ``lowbit.io.compressed_tensors``), which transformers loads with the
``compressed-tensors`` package and vLLM runs.

Quantized linears are written with lowbit's own codes and scales (no requantization). Every other tensor is
written with the values the model holds (in bfloat16 or float16 where that holds them exactly; ``config.json``
says float32, so readers widen them back); a quantized embedding is written dequantized (pack-quantized stores linear
layers). ``config.json`` gets a ``quantization_config`` with one config group per distinct format, whose
``targets`` are the module names.

Refused, naming the module: activation quantization, AWQ's per-input-channel scales (they need folding first),
online rotations, non-integer formats, block or tensor granularity, a row length that is not a whole number of
groups, and a layer whose bias the architecture does not have (bias correction on a bias-free layer).
vLLM's kernels run 4- and 8-bit ``pack-quantized`` weights; transformers dequantizes any width.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.atomic import atomic_folder
from lowbit.errors import InputError
from lowbit.export.checks import refuse, rotated_float_linears, weight_only_problem
from lowbit.io.compressed_tensors import FORMAT, PACKED, QUANT_METHOD, SCALE_FORMATS, packed_tensors, weights_args
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.nn.base import QuantModule
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

WEIGHTS = "model.safetensors"


def why_not_format(spec: QuantSpec) -> str | None:
    if spec.format != "int" or spec.granularity not in ("group", "channel"):
        return (f"weight format {spec.name} is not an integer format per channel or in groups, which is what "
                f"pack-quantized holds")
    if spec.scale_format not in SCALE_FORMATS:
        return f"weight format {spec.name} stores {spec.scale_format} scales (pack-quantized: fp16, bf16 or fp32)"
    return None


def why_not(name: str, m: QuantModule) -> str | None:
    """Why quantized linear ``name`` cannot be written as pack-quantized, or None."""
    why = why_not_format(m.spec)
    if why is not None:
        return f"{name}: {why}"
    if m.spec.granularity == "group" and m.weight_shape[1] % m.spec.group_size:
        cols = m.weight_shape[1]
        fits = [str(g) for g in (256, 128, 64, 32, 16) if cols % g == 0]
        return (f"{name}: {cols} input features are not a whole number of groups of {m.spec.group_size}, which "
                f"pack-quantized needs" + (f"; group sizes that fit: {', '.join(fits)}" if fits else ""))
    return weight_only_problem(name, m, "pack-quantized", "pack-quantized readers")


# ---- export -------------------------------------------------------------------------------------------------


def export_compressed_tensors(model: nn.Module, path: str | os.PathLike, *, tokenizer: Any = None,
                              overwrite: bool = False, check: bool = True) -> Path:
    """Write ``model`` (a lowbit-quantized transformers model) to the folder ``path`` as compressed-tensors
    ``pack-quantized``, with ``tokenizer``'s files when given. With ``check`` (and the ``compressed-tensors``
    package installed) the folder is loaded by transformers before it is put in place, and its logits on a
    few tokens must match the model's. Written under a temporary name: a failure leaves nothing. Returns the
    absolute folder path."""
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "to_dict"):
        raise InputError(f"compressed-tensors export needs a transformers model with a config; this "
                         f"{type(model).__name__} has none")
    dest = check_export_folder(path, overwrite)
    tensors, groups = _state(model)
    if not groups:
        raise InputError("compressed-tensors export: the model has no quantized linear layer")
    head_tied = _expected_keys(model, config, tensors)
    raw = config.to_dict()
    raw.pop("torch_dtype", None)
    raw["dtype"] = "float32"
    if not raw.get("architectures"):
        raw["architectures"] = [type(model).__name__]  # the class runtimes build (vLLM needs it)
    if not head_tied:
        raw["tie_word_embeddings"] = False
        if isinstance(raw.get("text_config"), dict):
            raw["text_config"]["tie_word_embeddings"] = False
    raw["quantization_config"] = _quantization_config(groups)
    import safetensors.torch

    with atomic_folder(dest) as tmp:
        try:
            safetensors.torch.save_file(tensors, tmp / WEIGHTS, metadata={"format": "pt"})
        except safetensors.SafetensorError as e:
            raise OSError(str(e)) from e
        (tmp / "config.json").write_text(json.dumps(raw, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        generation = getattr(model, "generation_config", None)
        if generation is not None:
            generation.save_pretrained(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        if check:
            check_in_transformers(model, tmp)
    log.info("wrote %s: %d quantized linear layer(s) in %d format(s)", dest,
             sum(len(v) for v in groups.values()), len(groups))
    return dest


def check_export_folder(path: str | os.PathLike, overwrite: bool, inputs: tuple[str | os.PathLike, ...] = ()) -> Path:
    """The export folder as an absolute path; InputError unless it is new, empty, or (with ``overwrite``) an
    earlier compressed-tensors export, outside ``inputs`` and writable."""
    from lowbit.paths import check_outside, check_writable, output_path

    dest = output_path(path)
    for src in inputs:
        check_outside(dest, Path(src))
    if dest.is_symlink():
        raise InputError(f"{dest} is a symbolic link; pass the folder it points to, or a new path")
    if dest.exists() and not dest.is_dir():
        raise InputError(f"{dest} exists and is not a folder; give a folder path for the export")
    if dest.is_dir() and any(dest.iterdir()):
        if not _is_export(dest):
            raise InputError(f"{dest} is a folder with other files and not a compressed-tensors export; lowbit will "
                             f"not replace it (even with --overwrite): choose a new or empty folder")
        if not overwrite:
            raise InputError(f"{dest} already holds a compressed-tensors export; pass --overwrite to replace it")
    check_writable(dest)
    return dest


def _is_export(folder: Path) -> bool:
    try:
        raw = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    qc = raw.get("quantization_config") if isinstance(raw, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def _state(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[QuantSpec, list[str]]]:
    """(tensors to write, quantized linear names per format)."""
    problems = rotated_float_linears(model, "pack-quantized readers")
    quantized: dict[str, QuantModule] = {}
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            why = why_not(name, m)
            if why is not None:
                problems.append(why)
            quantized[name] = m
        elif isinstance(m, QuantEmbedding):
            quantized[name] = m
        elif isinstance(m, QuantModule):
            problems.append(f"{name}: a quantized {type(m).__name__}; pack-quantized holds linear layers")
    refuse(problems, "compressed-tensors")
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[QuantSpec, list[str]] = {}
    for name, m in quantized.items():
        if isinstance(m, QuantEmbedding):
            log.info("%s: a quantized embedding is written dequantized (pack-quantized stores linear layers)", name)
            tensors[f"{name}.weight"] = m.dequantized_weight(torch.float32).contiguous()
            continue
        tensors.update({f"{name}.{k}": v for k, v in packed_tensors(m).items()})
        groups.setdefault(m.spec, []).append(name)
    seen: dict[int, str] = {}
    for key, t in model.state_dict().items():
        owner = key.rsplit(".", 1)[0]
        if owner in quantized:
            continue
        if t.data_ptr() in seen:  # a tied weight: written once, the config ties it
            continue
        seen[t.data_ptr()] = key
        tensors[key] = _narrowest(t.detach().contiguous())
    return tensors, groups


def _narrowest(t: torch.Tensor) -> torch.Tensor:
    """A float32 tensor as bfloat16 or float16 where that holds every value exactly (a float model's embedding,
    norms), so the file is not twice the size; the config's dtype (float32) widens it back on loading."""
    if t.dtype != torch.float32:
        return t
    for dt in (torch.bfloat16, torch.float16):
        n = t.to(dt)
        if torch.equal(n.float(), t):
            return n
    return t


def _expected_keys(model: nn.Module, config: Any, tensors: dict[str, torch.Tensor]) -> bool:
    """Check the tensors against the architecture the config builds (same keys, no extra bias); return whether
    the output head stays tied to the input embedding."""
    with torch.device("meta"):
        skeleton = type(model)(config)
    expected = set(skeleton.state_dict().keys())
    written = set()
    for key in tensors:
        owner, leaf = key.rsplit(".", 1)
        written.add(f"{owner}.weight" if leaf in PACKED else key)
    extra = sorted(written - expected)
    if extra:
        bias = [k for k in extra if k.endswith(".bias")]
        if bias:
            raise InputError(f"cannot export to compressed-tensors: {bias[0].rsplit('.', 1)[0]} has a bias that "
                             f"{type(model).__name__}'s layer does not (added by bias correction?); quantize without "
                             f"--bias-correction for this export")
        raise InputError(f"cannot export to compressed-tensors: tensor(s) {', '.join(extra[:3])} are not part of "
                         f"{type(model).__name__} as its config builds it")
    missing = sorted(expected - written)
    head = getattr(model, "lm_head", None)
    head_key = next((k for k in missing if head is not None and k == "lm_head.weight"), None)
    if [k for k in missing if k != head_key]:
        raise InputError(f"cannot export to compressed-tensors: no tensor for {', '.join(missing[:3])}")
    return head_key is not None


def _quantization_config(groups: dict[QuantSpec, list[str]]) -> dict[str, Any]:
    config_groups = {f"group_{i}": {"targets": sorted(names), "weights": weights_args(spec),
                                    "input_activations": None, "output_activations": None, "format": FORMAT}
                     for i, (spec, names) in enumerate(groups.items())}
    return {"quant_method": QUANT_METHOD, "format": FORMAT, "quantization_status": "compressed",
            "config_groups": config_groups, "ignore": [], "kv_cache_scheme": None,
            "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {}}


def check_in_transformers(model: nn.Module, folder: Path, tokens: int = 16, tolerance: float = 1e-3) -> None:
    """Load ``folder`` with transformers and compare its logits on ``tokens`` tokens with ``model``'s; InputError
    when they differ by more than ``tolerance`` of the logits' range. Skipped, with a warning, without the
    ``compressed-tensors`` package."""
    try:
        import compressed_tensors  # noqa: F401
    except ImportError:
        log.warning("compressed-tensors is not installed: the export was not loaded in transformers to check it")
        return
    from transformers import AutoModelForCausalLM

    if not hasattr(model, "lm_head"):
        log.info("not a causal LM: the export's logits are not compared")
        return
    loaded = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, dtype=torch.float32).eval()
    ids = torch.arange(tokens).remainder(int(model.config.vocab_size)).reshape(1, -1) + 1
    with torch.no_grad():
        want = model(ids).logits.float()
        got = loaded(ids).logits.float()
    err = float((got - want).abs().max())
    span = float(want.max() - want.min()) or 1.0
    if not err <= tolerance * span:
        raise InputError(f"the compressed-tensors export loaded in transformers gives logits up to {err:.3g} away "
                         f"from lowbit's (range {span:.3g}); nothing was written")
    log.info("checked in transformers: logits within %.2g of lowbit's (range %.3g)", err, span)


# ---- reading ------------------------------------------------------------------------------------------------



"""compressed-tensors ``pack-quantized`` tensors: the layout llm-compressor writes, transformers loads (with the
``compressed-tensors`` package) and vLLM runs. This module holds the format (packing, the config's weight
arguments) and reads such a folder into lowbit layers; ``lowbit.export.compressed_tensors`` writes one.

A quantized linear ``NAME`` of an integer weight-only format (2-8 bits, per channel or in groups, symmetric or
with a zero point, fp16/bf16/fp32 scales) is stored, with lowbit's own codes and scales, as

    NAME.weight_packed      int32 (out, ceil(in * bits / 32))    codes, 32 per `bits` words, lowest bits first
    NAME.weight_scale       (out, in / group) or (out, 1)         the scales, in their storage dtype
    NAME.weight_zero_point  int32 (ceil(out * bits / 32), groups) zero points packed along the rows (asym only)
    NAME.weight_shape       int64 (2,)                            (out, in)

and dequantized as ``(q - z) * scale``. compressed-tensors keeps codes signed (``q - 2^(bits-1)``) and packs
them with that offset added back, so the packed words hold lowbit's unsigned codes as they are, and a
symmetric format's implicit zero point is the offset.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.formats import QuantizedTensor
from lowbit.nn import QuantLinear
from lowbit.nn.base import QuantModule
from lowbit.spec import QuantSpec

FORMAT = "pack-quantized"
QUANT_METHOD = "compressed-tensors"
SCALE_FORMATS = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
PACKED = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")


def weights_args(spec: QuantSpec) -> dict[str, Any]:
    """compressed-tensors' ``QuantizationArgs`` of a lowbit integer weight format (see :func:`why_not_format`)."""
    return {"num_bits": spec.bits, "type": "int", "symmetric": spec.symmetric,
            "strategy": "group" if spec.granularity == "group" else "channel",
            "group_size": spec.group_size, "dynamic": False, "actorder": None, "block_structure": None,
            "observer": "minmax", "observer_kwargs": {}}


def spec_of_args(args: dict[str, Any], scale_dtype: torch.dtype, where: str) -> QuantSpec:
    """The lowbit spec of compressed-tensors weight arguments and the scales' dtype; InputError for the rest."""
    scale_format = {v: k for k, v in SCALE_FORMATS.items()}.get(scale_dtype)
    strategy = args.get("strategy")
    if args.get("type") != "int" or not isinstance(args.get("num_bits"), int) or not 2 <= args["num_bits"] <= 8:
        raise InputError(f"{where}: weights of type {args.get('type')!r} with {args.get('num_bits')!r} bits; lowbit "
                         f"reads integer weights of 2-8 bits")
    if strategy not in ("group", "channel") or scale_format is None:
        raise InputError(f"{where}: strategy {strategy!r} with {scale_dtype} scales; lowbit reads group or channel "
                         f"strategies with fp16, bf16 or fp32 scales")
    if args.get("actorder") not in (None, "weight") or args.get("dynamic"):
        raise InputError(f"{where}: activation-ordered groups or dynamic weights are not read by lowbit")
    group = args.get("group_size") if strategy == "group" else None
    return QuantSpec("int", int(args["num_bits"]), bool(args.get("symmetric", True)),
                     "group" if group else "channel", group, scale_format=scale_format)


def pack_int32(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes ``(rows, cols)`` -> int32 ``(rows, ceil(cols * bits / 32))``: each row's codes as one bit
    stream, code ``i`` in bits ``[i * bits, (i + 1) * bits)``, cut into little-endian 32-bit words (the rows
    padded with zero codes to a multiple of 32 first)."""
    rows, cols = codes.shape
    padded = -(-cols // 32) * 32
    c = np.zeros((rows, padded), dtype=np.uint8)
    c[:, :cols] = codes.numpy()
    stream = np.unpackbits(c[..., None], axis=-1, bitorder="little")[..., :bits].reshape(rows, -1)
    words = np.packbits(stream, axis=-1, bitorder="little").view("<i4")
    return torch.from_numpy(np.ascontiguousarray(words[:, :-(-cols * bits // 32)]))


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`pack_int32`: int32 ``(rows, words)`` -> uint8 codes ``(rows, cols)``."""
    rows = packed.shape[0]
    stream = np.unpackbits(packed.numpy().astype("<i4").view(np.uint8), axis=-1, bitorder="little")
    stream = stream[:, :cols * bits].reshape(rows, cols, bits)
    return torch.from_numpy((stream.astype(np.uint8) << np.arange(bits, dtype=np.uint8)).sum(-1, dtype=np.uint8))


def packed_tensors(m: QuantLinear) -> dict[str, torch.Tensor]:
    """The pack-quantized tensors of one linear (keys without the module name)."""
    q = m.quantized_weight()
    out = {"weight_packed": pack_int32(q.codes, m.spec.bits),
           "weight_scale": q.scale.to(SCALE_FORMATS[m.spec.scale_format]).contiguous(),
           "weight_shape": torch.tensor(list(m.weight_shape), dtype=torch.int64)}
    if q.zero_point is not None:
        out["weight_zero_point"] = pack_int32(q.zero_point.t().contiguous(), m.spec.bits).t().contiguous()
    if m.bias is not None:
        out["bias"] = m.bias.detach().float().contiguous()
    return out


def quantized_of(tensors: dict[str, torch.Tensor], spec: QuantSpec, where: str) -> QuantizedTensor:
    """A linear's stored weight from its pack-quantized tensors (inverse of :func:`packed_tensors`)."""
    try:
        out, cols = (int(v) for v in tensors["weight_shape"].tolist())
        codes = unpack_int32(tensors["weight_packed"], spec.bits, cols)
        scale = tensors["weight_scale"].float().reshape(out, -1)
        zp = None
        if spec.has_zero_point:
            zp = unpack_int32(tensors["weight_zero_point"].t().contiguous(), spec.bits, out).t().contiguous()
    except (KeyError, ValueError, RuntimeError) as e:
        raise InputError(f"{where}: pack-quantized tensors do not fit together ({type(e).__name__}: {e})") from None
    groups = 1 if spec.granularity == "channel" else -(-cols // spec.group_size)
    if codes.shape != (out, cols) or scale.shape != (out, groups) or (zp is not None and zp.shape != (out, groups)):
        raise InputError(f"{where}: packed weight, scales and zero points do not match weight_shape {(out, cols)}")
    return QuantizedTensor(codes, scale, zp, None, spec)


def is_compressed_tensors(raw_config: Any) -> bool:
    qc = raw_config.get("quantization_config") if isinstance(raw_config, dict) else None
    return isinstance(qc, dict) and qc.get("quant_method") == QUANT_METHOD


def read_compressed_tensors(folder: Path, config: Any, cls: Any) -> nn.Module:
    """A lowbit model (``QuantLinear`` layers with the file's codes and scales) from a pack-quantized folder
    whose transformers ``config`` and model class ``cls`` the caller read."""
    import safetensors
    import safetensors.torch

    qc = config.quantization_config
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    if qc.get("format") not in (FORMAT, None) or any(g.get("format", FORMAT) != FORMAT
                                                     for g in qc.get("config_groups", {}).values()):
        raise InputError(f"{folder}: compressed-tensors format {qc.get('format')!r}; lowbit reads {FORMAT!r}")
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InputError(f"{folder}: no .safetensors file")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(safetensors.torch.load_file(f))
        except (safetensors.SafetensorError, OSError) as e:
            raise InputError(f"{f}: not a readable safetensors file ({e})") from None
    del config.quantization_config
    # built on the CPU, not on the meta device: non-persistent buffers (rotary tables) are computed at construction
    model = cls.from_config(config) if hasattr(cls, "from_config") else cls(config)
    modules = dict(model.named_modules())
    for name in sorted({k.rsplit(".", 1)[0] for k in state if k.endswith(".weight_packed")}):
        where = f"{folder}: {name}"
        target = modules.get(name)
        if not isinstance(target, nn.Linear):
            raise InputError(f"{where}: packed weights for {type(target).__name__ if target else 'no module'}; "
                             f"lowbit reads packed linear layers")
        if f"{name}.weight_g_idx" in state:
            raise InputError(f"{where}: activation-ordered groups (weight_g_idx) are not read by lowbit")
        if f"{name}.weight_scale" not in state or f"{name}.weight_shape" not in state:
            raise InputError(f"{where}: packed weights without weight_scale / weight_shape")
        spec = spec_of_args(_args_for(qc, name, target, where), state[f"{name}.weight_scale"].dtype, where)
        parts = {k: state.pop(f"{name}.{k}") for k in PACKED if f"{name}.{k}" in state}
        q = quantized_of(parts, spec, where)
        bias = state.pop(f"{name}.bias", None)
        model.set_submodule(name, QuantLinear.from_float(torch.empty(q.shape), bias, q))
    missing, unexpected = model.load_state_dict(state, strict=False)
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if isinstance(head, nn.Linear) and emb is not None and head.weight is emb.weight:
        missing = [k for k in missing if k != "lm_head.weight"]  # tied: loaded with the embedding
    missing = [k for k in missing if not _is_quant_buffer(model, k)]
    if missing or unexpected:
        raise InputError(f"{folder}: tensors do not match {cls.__name__}: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}")
    return model.float().eval()


def _is_quant_buffer(model: nn.Module, key: str) -> bool:
    owner = key.rsplit(".", 1)[0]
    return isinstance(model.get_submodule(owner), QuantModule) if owner else False


def _args_for(qc: dict[str, Any], name: str, module: nn.Module, where: str) -> dict[str, Any]:
    """The weight arguments of the config group whose targets match module ``name`` (exact name, ``re:`` pattern
    or class name, as compressed-tensors matches them), not ignored."""
    def hit(patterns: Any) -> bool:
        return any(p == name or p == type(module).__name__ or (p.startswith("re:") and re.match(p[3:], name))
                   for p in patterns or () if isinstance(p, str))

    if hit(qc.get("ignore")):
        raise InputError(f"{where}: packed weights for a module the config ignores")
    for group in (qc.get("config_groups") or {}).values():
        if isinstance(group, dict) and hit(group.get("targets")) and isinstance(group.get("weights"), dict):
            return group["weights"]
    raise InputError(f"{where}: no config group of quantization_config targets this module")

"""Quantize and dequantize tensors under a QuantSpec: the pure math every algorithm and module shares.

``quantize(x, spec, lo, hi)`` turns a float tensor into a :class:`QuantizedTensor` (element codes plus
per-tile scales, zero points and, for NVFP4-style specs, one per-tensor scale). ``lo``/``hi`` give the range
each tile is mapped onto (an observer's or a clipping search's result, shape ``(gr, gc)``); without them
the tile's own min/max is used (its mean magnitude for ternary, after BitNet b1.58).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lowbit.errors import InputError
from lowbit.formats import blocks as B
from lowbit.formats.elements import decode_elements, element_max, encode_elements
from lowbit.formats.scales import round_scale, scale_range_issue, split_global_scale, split_super_scale, super_expand
from lowbit.spec import KSCALE_MAX, QuantSpec


@dataclass(frozen=True, eq=False)
class QuantizedTensor:
    """A tensor stored as codes and scales.

    Attributes:
        codes: uint8, the original tensor's shape; one code per element (unpacked).
        scale: float32 ``(gr, gc)``; every value is exactly representable in ``spec.scale_format``.
        zero_point: uint8 ``(gr, gc)`` for asymmetric integers, else None.
        global_scale: float32 0-d tensor for ``fp8_e4m3`` scale storage (NVFP4), else None.
        spec: the format.
        super_scale: k-quant scales (``spec.has_super_scale``): float32 ``(gr, ns)``, the fp16 scale of each
            super-block of 256 elements; ``scale`` is then an integer times it, exactly.
        super_min: k-quant formats with a float minimum (``spec.has_float_min``): float32 ``(gr, ns)``, the fp16
            scale of the minimums; ``zero_point`` then holds each tile's integer minimum code ``m``, and a
            value is ``code * scale - m * super_min`` (llama.cpp's Q2_K / Q4_K / Q5_K).
    """

    codes: torch.Tensor
    scale: torch.Tensor
    zero_point: torch.Tensor | None
    global_scale: torch.Tensor | None
    spec: QuantSpec
    super_scale: torch.Tensor | None = None
    super_min: torch.Tensor | None = None

    @property
    def offset(self) -> torch.Tensor | None:
        """Float-minimum formats: each tile's minimum ``m * super_min``, float32 ``(gr, gc)``; else None."""
        if not self.spec.has_float_min:
            return None
        return self.zero_point.float() * super_expand(self.super_min, self.spec.tiles_per_super, self.scale.shape[1])

    @property
    def scale_codes(self) -> torch.Tensor:
        """k-quant formats: each tile's scale as the integer times its super-block's fp16 scale, float32
        ``(gr, gc)`` (what the module stores and GGUF's blocks hold)."""
        full = super_expand(self.super_scale, self.spec.tiles_per_super, self.scale.shape[1])
        return torch.round(self.scale / torch.where(full > 0, full, torch.ones_like(full)))

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self, dtype)


def all_finite(x: torch.Tensor) -> bool:
    """True when ``x`` holds no NaN or Inf (integer and empty tensors: True).

    One min/max pass (NaN propagates through both), without ``torch.isfinite``'s full-size boolean temporary:
    about 15x faster on a weight matrix, which matters where every call of a search re-checks its input."""
    if x.numel() == 0 or not (x.is_floating_point() or x.is_complex()):
        return True
    if x.is_complex():
        return bool(torch.isfinite(x).all())
    lo, hi = torch.aminmax(x.detach())
    return bool(torch.isfinite(lo) & torch.isfinite(hi))


def default_range(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile range used when no observer gives one: ``(lo, hi)``, each float32 ``(gr, gc)``."""
    if spec.format == "ternary":
        absmean = B.block_sum(x.float().abs(), spec) / B.block_counts(spec, x.shape)
        return -absmean, absmean
    lo, hi = B.block_minmax(x.float(), spec)
    return lo, hi


def quantize(
    x: torch.Tensor,
    spec: QuantSpec,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize ``x`` (float, any shape with at least one element) to ``spec``.

    Args:
        x: the tensor; seen as the 2-D matrix ``(shape[0], prod(shape[1:]))`` for granularity.
        lo, hi: optional ``(gr, gc)`` range per tile; values outside are clipped. Both or neither.
    Raises:
        InputError: ``x`` holds NaN/Inf, is empty, or ``lo``/``hi`` do not match the scale grid.
    """
    if x.numel() == 0:
        raise InputError("cannot quantize an empty tensor")
    xf = x.detach().float()
    if not all_finite(xf):
        bad = int((~torch.isfinite(xf)).sum())
        raise InputError(f"tensor of shape {tuple(x.shape)} holds {bad} NaN/Inf value(s)")
    grid = B.grid_shape(spec, x.shape)
    if (lo is None) != (hi is None):
        raise InputError("give both lo and hi, or neither")
    if lo is None:
        lo, hi = default_range(xf, spec)
    elif tuple(lo.shape) != grid or tuple(hi.shape) != grid:
        raise InputError(f"range of shape {tuple(lo.shape)} does not match the scale grid {grid} of {spec.name}")
    lo, hi = lo.float(), hi.float()
    if spec.has_super_scale:
        return _quantize_k(xf, spec, lo, hi)
    if spec.has_zero_point:
        return _quantize_affine(xf, spec, lo, hi)
    return _quantize_symmetric(xf, spec, lo, hi)


def dequantize(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Codes and scales -> values, shape ``q.shape``, in ``dtype``."""
    spec = q.spec
    cb = B.to_blocks(q.codes, spec)  # (gr, br, gc, bc) uint8
    if spec.has_float_min:  # llama.cpp's order: (d * sc) * q - (dmin * m), in float32
        vals = cb.float() * B.expand(q.scale) - B.expand(q.offset)
        return B.from_blocks(vals, q.shape).to(dtype)
    if spec.format == "int":
        zp = q.zero_point.float() if q.zero_point is not None else torch.full_like(q.scale, 2.0 ** (spec.bits - 1))
        vals = cb.float() - B.expand(zp)
    else:
        vals = decode_elements(cb, spec.format)
    scale = q.scale if q.global_scale is None else q.scale * q.global_scale
    return B.from_blocks(vals * B.expand(scale), q.shape).to(dtype)


def fake_quantize(
    x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None = None, hi: torch.Tensor | None = None
) -> torch.Tensor:
    """``dequantize(quantize(x, spec, lo, hi))`` in ``x``'s dtype: the value a quantized model computes with."""
    return dequantize(quantize(x, spec, lo, hi), x.dtype)


def fake_quantize_dynamic(x: torch.Tensor, spec: QuantSpec, clip: float = 1.0) -> torch.Tensor:
    """:func:`fake_quantize` of ``x`` with its own per-tile range times ``clip`` (values beyond are clipped)."""
    if clip == 1.0:
        return fake_quantize(x, spec)
    lo, hi = default_range(x.detach().float(), spec)
    return fake_quantize(x, spec, lo * clip, hi * clip)


def _quantize_k(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> QuantizedTensor:
    """llama.cpp k-quant scaling: each tile's scale (and, with a zero point, its minimum ``-min(lo, 0)``) an
    integer times an fp16 scale per super-block of 256 elements (:func:`~lowbit.formats.scales.split_super_scale`).
    Symmetric: codes ``round(x / scale)`` centred on ``2^(bits-1)``; with a minimum: ``round((x + min) / scale)``
    in ``0 .. 2^bits - 1``."""
    tiles = spec.tiles_per_super
    code_max = KSCALE_MAX[(spec.scale_format, spec.symmetric)]
    raw = raw_scale(lo, hi, spec)  # (gr, gc)
    sc, d = split_super_scale(raw, code_max, tiles)
    scale = sc * super_expand(d, tiles, raw.shape[1])
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    if spec.symmetric:
        half = 2 ** (spec.bits - 1)
        codes = torch.round(B.to_blocks(x, spec) / B.expand(safe)).clamp(-half, half - 1) + half
        return QuantizedTensor(B.from_blocks(codes.to(torch.uint8), x.shape), scale, None, None, spec, d)
    m, dmin = split_super_scale(-lo.clamp(max=0), code_max, tiles, keep_nonzero=False)
    offset = m * super_expand(dmin, tiles, raw.shape[1])
    codes = torch.round((B.to_blocks(x, spec) + B.expand(offset)) / B.expand(safe)).clamp(0, 2**spec.bits - 1)
    return QuantizedTensor(B.from_blocks(codes.to(torch.uint8), x.shape), scale, m.to(torch.uint8), None, spec, d,
                           dmin)


def raw_scale(lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """The fp32 scale of each tile before it is rounded to ``spec.scale_format``: ``(gr, gc)``.

    Symmetric: ``max(|lo|, |hi|) / elem_max``; asymmetric integers: ``(max(hi, 0) - min(lo, 0)) / (2^bits - 1)``.
    """
    if spec.has_zero_point:
        return (hi.float().clamp(min=0) - lo.float().clamp(max=0)) / (2**spec.bits - 1)
    return torch.maximum(lo.float().abs(), hi.float().abs()) / element_max(spec.format, spec.bits)


def scale_storage_issue(x: torch.Tensor, spec: QuantSpec, margin: float = 1.0) -> str | None:
    """Why ``x``'s own per-tile scales would not fit ``spec.scale_format`` (see
    :func:`~lowbit.formats.scales.scale_range_issue`), or None."""
    xf = x.detach().float()
    lo, hi = default_range(xf, spec)
    return scale_range_issue(raw_scale(lo, hi, spec), spec.scale_format, margin, B.block_sum(xf * xf, spec))


# ---- the two scaling schemes -------------------------------------------------------------------------


def _quantize_symmetric(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> QuantizedTensor:
    """``scale = amax / elem_max``; codes = nearest element of ``x / scale`` (saturating)."""
    emax = element_max(spec.format, spec.bits)
    raw = raw_scale(lo, hi, spec)  # (gr, gc)
    global_scale = None
    if spec.has_global_scale:
        raw, global_scale = split_global_scale(raw)
    scale = round_scale(raw, spec.scale_format, emax)
    full = scale if global_scale is None else scale * global_scale
    safe = torch.where(full > 0, full, torch.ones_like(full))
    xb = B.to_blocks(x, spec) / B.expand(safe)  # (gr, br, gc, bc)
    if spec.format == "int":
        half = 2 ** (spec.bits - 1)
        codes = (torch.round(xb).clamp(-half, half - 1) + half).to(torch.uint8)
    else:
        codes = encode_elements(xb.clamp(-emax, emax), spec.format)
    return QuantizedTensor(B.from_blocks(codes, x.shape), scale, None, global_scale, spec)


def _quantize_affine(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> QuantizedTensor:
    """Asymmetric integers: the range ``[min(lo,0), max(hi,0)]`` maps onto codes ``0 .. 2^bits - 1``."""
    qmax = 2**spec.bits - 1
    raw = raw_scale(lo, hi, spec)  # (gr, gc)
    lo = lo.clamp(max=0)
    global_scale = None
    if spec.has_global_scale:  # fp8 scales are relative to one fp32 scale, as in the symmetric case
        raw, global_scale = split_global_scale(raw)
    scale = round_scale(raw, spec.scale_format, float(qmax))
    full = scale if global_scale is None else scale * global_scale
    safe = torch.where(full > 0, full, torch.ones_like(full))
    zero_point = torch.round(-lo / safe).clamp(0, qmax)  # (gr, gc)
    xb = B.to_blocks(x, spec) / B.expand(safe) + B.expand(zero_point)
    codes = torch.round(xb).clamp(0, qmax).to(torch.uint8)
    return QuantizedTensor(B.from_blocks(codes, x.shape), scale, zero_point.to(torch.uint8), global_scale, spec)

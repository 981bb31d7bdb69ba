"""Scale storage: rounding scales to what their storage format can hold, and encoding them for files.

Scales are computed in fp32, rounded to the storage format (``QuantSpec.scale_format``) and only then used
to compute codes, so the stored scale is exactly the one the codes were made with.

* ``fp32`` / ``fp16`` / ``bf16``: plain floats (clamped to the format's smallest normal value), rounded
  up, never down: a scale rounded down would shrink the grid below the range it was computed for and clip
  the range's ends by more than half a step (up to a whole step for 8-bit asymmetric codes with bf16 scales).
* ``e8m0``: a power of two stored as a biased 8-bit exponent, as in the OCP Microscaling (MX) spec v1.0:
  ``X = 2^(floor(log2(amax)) - emax_elem)``.
* ``fp8_e4m3``: NVFP4-style two-level scaling: one fp32 scale per tensor and an FP8 E4M3 scale per block.
* ``k4`` / ``k6`` / ``k8``: llama.cpp's k-quant two-level scaling: an integer per tile times an fp16 scale per
  256 elements of a row (:func:`split_super_scale`); the module stores the integers and the fp16 scales.
"""

from __future__ import annotations

import math

import torch

_FLOAT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP8_E4M3_MAX = 448.0


def round_scale(scale: torch.Tensor, scale_format: str, elem_max: float) -> torch.Tensor:
    """Round raw fp32 scales ``amax / elem_max`` to the storage format; returns fp32 of the same shape.

    For ``e8m0`` the raw scale is re-derived from ``amax = scale * elem_max`` following the MX spec.
    ``fp8_e4m3`` scales are relative to a per-tensor scale; see :func:`split_global_scale`.
    """
    scale = scale.float()
    if scale_format in _FLOAT_DTYPES:
        dt = _FLOAT_DTYPES[scale_format]
        fi = torch.finfo(dt)
        c = scale.clamp(fi.tiny, fi.max)
        r = c.to(dt)  # nearest; step up where that fell below c, so the grid still covers the range
        r = torch.where(r.float() < c, torch.nextafter(r, torch.full_like(r, fi.max)), r)
        return r.float()
    if scale_format == "e8m0":
        amax = scale * elem_max
        emax_elem = math.floor(math.log2(elem_max))
        # floor(log2(amax)) exactly: frexp gives amax = m * 2^e with m in [0.5, 1); an fp32 log2 rounds
        # values a few ulps below a power of two up to it
        _, e = torch.frexp(amax.clamp_min(2.0**-126))
        e = (e - 1 - emax_elem).float()
        return torch.exp2(e.clamp(-127, 127))
    if scale_format == "fp8_e4m3":
        return scale.clamp(0, FP8_E4M3_MAX).to(torch.float8_e4m3fn).float()
    raise KeyError(scale_format)


# the widest range each storage can hold: (smallest normal, largest) value
_SCALE_RANGE = {**{k: (torch.finfo(d).tiny, torch.finfo(d).max) for k, d in _FLOAT_DTYPES.items()},
                "e8m0": (2.0**-127, 2.0**127)}


# an underflowing tile loses at most all of its values; below this fraction of the weight's energy (sum of
# squares) that loss is far under any rounding noise (8-bit rounding alone leaves ~2e-5) and is let pass
UNDERFLOW_ENERGY = 1e-6


def scale_range_issue(raw: torch.Tensor, scale_format: str, margin: float = 1.0,
                      energy: torch.Tensor | None = None) -> str | None:
    """Why raw fp32 scales ``(gr, gc)`` do not fit ``scale_format``, or None when they do.

    A nonzero scale below the format's smallest normal value (times ``margin``, room for a clipping search
    that shrinks ranges) is clamped up to it, so the tile's grid is far coarser than its values and they
    round to zero; that counts only when those tiles hold more than :data:`UNDERFLOW_ENERGY` of ``energy``
    (per-tile sums of squares, ``(gr, gc)``; None: any such tile counts), so near-dead channels of a
    trained CNN (weights ~1e-11) do not. A scale above the format's largest value is clamped down and its
    tile saturates: that always counts. Zero scales (all-zero tiles) are fine. ``fp8_e4m3`` scales are
    relative to a per-tensor scale (NVFP4) and always fit.
    """
    if scale_format not in _SCALE_RANGE:
        return None
    tiny, big = _SCALE_RANGE[scale_format]
    over = raw > big / margin
    if over.any():
        return f"scales up to {float(raw.max()):.3g} overflow {scale_format} (largest {big:.3g})"
    under = (raw > 0) & (raw < tiny * margin)
    if not under.any():
        return None
    share = 1.0 if energy is None else float(energy[under].sum() / energy.sum().clamp_min(1e-300))
    if share <= UNDERFLOW_ENERGY:
        return None
    return (f"scales down to {float(raw[under].min()):.3g} underflow {scale_format} (smallest normal {tiny:.3g}) "
            f"in {int(under.sum())} of {raw.numel()} tile(s), holding {share:.2%} of the weight's energy")


def split_global_scale(raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """NVFP4 two-level scales: raw per-block fp32 scales -> (per-block scale relative to g, g).

    ``g = max(raw) / 448`` (fp32, 0-d) so the largest block scale uses FP8 E4M3's full range.
    """
    g = (raw.max() / FP8_E4M3_MAX).clamp_min(torch.finfo(torch.float32).tiny).float()
    return raw / g, g


def super_expand(per_super: torch.Tensor, tiles_per_super: int, gc: int) -> torch.Tensor:
    """A per-super-block tensor ``(gr, ns)`` repeated for each of its tiles: ``(gr, gc)``."""
    return per_super.repeat_interleave(tiles_per_super, dim=1)[:, :gc]


def split_super_scale(raw: torch.Tensor, code_max: int, tiles_per_super: int,
                      keep_nonzero: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """k-quant two-level scales: raw per-tile values ``(gr, gc)`` (>= 0) -> (integer codes ``(gr, gc)`` as float32,
    fp16 super-block scale ``d`` ``(gr, ns)`` as float32), so that ``codes * d`` approximates ``raw``.

    ``d = max(raw) / code_max`` over the super-block's tiles, rounded up to fp16, subnormals included as llama.cpp
    stores them (so no code exceeds ``code_max``); codes are ``raw / d`` rounded to nearest. ``keep_nonzero``: a
    tile with a nonzero raw value keeps a code of at least 1 (a scale rounded to 0 would zero the whole tile).
    ``codes * d`` is exact in float32 (11 + 8 significant bits), as llama.cpp computes it.
    """
    gr, gc = raw.shape
    ns = -(-gc // tiles_per_super)
    padded = torch.nn.functional.pad(raw.float(), (0, ns * tiles_per_super - gc))
    top = padded.reshape(gr, ns, tiles_per_super).amax(dim=2)  # (gr, ns)
    want = (top / code_max).clamp(max=torch.finfo(torch.float16).max)
    d = want.to(torch.float16)
    d = torch.where(d.float() < want, torch.nextafter(d, torch.full_like(d, torch.inf)), d).float()
    full = super_expand(d, tiles_per_super, gc)
    codes = torch.round(raw.float() / torch.where(full > 0, full, torch.ones_like(full))).clamp(0, code_max)
    if keep_nonzero:
        codes = torch.where(raw > 0, codes.clamp_min(1), codes)
    return codes, d


def encode_scale(scale: torch.Tensor, scale_format: str) -> torch.Tensor:
    """fp32 scales (already rounded) -> the tensor stored in a file (fp16, uint8 exponents, float8 bits ...)."""
    if scale_format in _FLOAT_DTYPES:
        return scale.to(_FLOAT_DTYPES[scale_format])
    if scale_format == "e8m0":
        return (torch.log2(scale).round() + 127).clamp(0, 254).to(torch.uint8)
    if scale_format == "fp8_e4m3":
        return scale.to(torch.float8_e4m3fn).view(torch.uint8)
    raise KeyError(scale_format)


def decode_scale(stored: torch.Tensor, scale_format: str) -> torch.Tensor:
    """Inverse of :func:`encode_scale`: stored tensor -> fp32 scales."""
    if scale_format in _FLOAT_DTYPES:
        return stored.float()
    if scale_format == "e8m0":
        return torch.exp2(stored.float() - 127)
    if scale_format == "fp8_e4m3":
        return stored.view(torch.float8_e4m3fn).float()
    raise KeyError(scale_format)

"""W4A8 on lowbit's AVX2 kernel: packed 4-bit weight codes x 8-bit activations, exact integer sums.

lowbit stores 4-bit integer codes ``q`` in 0..15 with ``w = (q - zp) * s`` per group (``zp = 8`` when
symmetric). The activation is quantized exactly as the W8A8 kernel does (``lowbit.kernels.int8``:
``x = (a + p) * t`` per token or per tensor, signed codes ``a``, offset ``p`` for asymmetric specs), and the
C++ kernel (``csrc/w4a8_avx2.cpp``) computes, per group ``g`` and in integers,

    D[m, n, g] = sum_{k in g} a_mk (q_nk - zp_ng)

then ``y[m, n] = t_m * (sum_g s_ng D[m, n, g] + p_m W_n)`` with ``W_n = sum_g s_ng sum_{k in g} (q_nk - zp_ng)``
(the asymmetric-activation term, added in float here). Unlike ``w4a8-int-mm`` it reads the weights packed two
per byte (the memory of the saved artifact) and does not need VNNI: on an AVX2-only CPU, where
``torch._int_mm`` runs at a few GMAC/s, it is the W4A8 path that beats fp32. Exact to float32 rounding against
the reference path.
"""

from __future__ import annotations

import functools

import torch

from lowbit.errors import InputError
from lowbit import native
from lowbit.kernels.checks import check_width, int_linear_why_not
from lowbit.kernels.dequant import sliced_linear
from lowbit.kernels.int8 import act_why_not, input_codes
from lowbit.kernels.w4a8 import group_count, group_width
from lowbit.nn.base import QuantModule
from lowbit.nn.linear import QuantLinear

CHUNK = 32  # columns per AVX2 register of int8 codes
ROW_BLOCK = 8  # the kernel's output rows come in blocks of 8: a layer of any other width is padded with zero rows


def why_not(m: QuantModule) -> str | None:
    why = int_linear_why_not(m, 4, ("group", "channel")) or act_why_not(m)
    if why is not None:
        return why
    k, n = m.in_features, m.out_features
    g = group_width(m.spec, k)
    last = k - (group_count(k, g) - 1) * g
    if g % CHUNK or last % CHUNK:
        return f"group size {g} and last group {last} must be multiples of {CHUNK}"
    return native.why_unavailable()


def pack(m: QuantLinear) -> dict:
    """The kernel's copy of ``m``'s weight (see :func:`pack_codes`)."""
    q = m.quantized_weight()
    n, k = m.weight_shape
    g = group_width(m.spec, k)
    scale = (q.scale if q.global_scale is None else q.scale * q.global_scale).float().reshape(n, -1)
    zero = q.zero_point.reshape(n, -1) if q.zero_point is not None else torch.full_like(scale, 8, dtype=torch.uint8)
    return pack_codes(q.codes, zero, scale, g)


def pack_codes(codes: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, g: int) -> dict:
    """4-bit codes ``(out, in)`` in 0..15 with zero points and scales ``(out, groups)`` of ``g`` columns (the
    last group may be shorter) -> ``weight`` uint8 ``(n, ceil(in / 64) * 32)`` (two codes a byte, the
    kernel's layout); ``zero`` int8 ``(n, groups)``; ``scale`` float32 and ``corr`` int32 ``(groups, n)``;
    ``wsum`` float32 ``(n,)``; ``group``: columns per group; ``n``: ``out`` rounded up to :data:`ROW_BLOCK`
    (the extra rows have zero codes, zero points and scales: they compute zeros, and are cut off)."""
    pad = -codes.shape[0] % ROW_BLOCK
    if pad:
        codes, zero, scale = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (codes, zero, scale))
    n, k = codes.shape
    groups = group_count(k, g)
    zero = zero.to(torch.int16)
    widths = torch.tensor([min(k, (i + 1) * g) - i * g for i in range(groups)])
    centered = codes.to(torch.int16) - zero.repeat_interleave(widths, dim=1)  # (out, in), q - zp
    csum = torch.stack([part.sum(1) for part in centered.split(widths.tolist(), dim=1)], 1).to(torch.int32)
    return {"weight": _pack_nibbles(codes), "zero": zero.to(torch.int8).contiguous(),
            "scale": scale.t().contiguous(), "corr": (128 * csum).t().contiguous(),
            "wsum": (scale * csum.float()).sum(1), "group": g, "n": n}


def _pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """``codes`` uint8 ``(out, in)`` in 0..15 -> ``(out, ceil(in / 64) * 32)``: per block of 64 columns, byte
    ``j`` holds column ``j`` in its low nibble and column ``32 + j`` in its high nibble (zero padded)."""
    n, k = codes.shape
    pad = -k % 64
    c = torch.nn.functional.pad(codes, (0, pad)).reshape(n, -1, 2, CHUNK)  # (out, blocks, 2, 32)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, -1).contiguous()


def run(m: QuantLinear, st: dict, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., in)`` (already through the layer's input transforms) -> ``(..., out)`` in ``x``'s dtype."""
    return linear(m, st, x, repeat=1)


def linear(m: QuantLinear, st: dict, x: torch.Tensor, repeat: int) -> torch.Tensor:
    """The layer on the packed ``st`` (whose columns are ``repeat`` x ``in_features``: each group of
    ``in_features`` columns reads the activation codes from their start, as W8A8's two nibbles do).

    Symmetric per-token int8 activations with fp16/fp32 scales (every decode step of the usual recipes) run
    as one C call: quantize, product, scale and bias. Anything else quantizes through torch first. (The integer
    product beats torch's float one at every row count measured, up to 512 rows: ``benchmarks/linear_kernels.py``,
    so unlike the weight-only kernels this one never takes a float32 weight.)"""
    k, out = m.in_features, m.out_features
    check_width(x, k)
    rows = x.numel() // k if k else 0
    half = _native_scale(m.act)
    if half is not None:  # the decode path: as few torch calls as possible (each costs microseconds)
        xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        n = st["n"]
        y = torch.empty(*x.shape[:-1], n)
        if rows:
            b = m.bias
            if b is not None and (b.dtype != torch.float32 or b.numel() != n or not b.is_contiguous()):
                b = torch.nn.functional.pad(b.float(), (0, n - out)).contiguous()
            rc = _linear_s8()(
                xf.data_ptr(), None, None, st["weight"].data_ptr(), st["zero"].data_ptr(), st["scale"].data_ptr(),
                st["corr"].data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), rows, n, repeat * k, k,
                st["group"], half, torch.get_num_threads())
            _check(rc, x, f"M={rows}, N={n}, K={repeat * k}, group={st['group']}")
        if n != out:
            y = y[..., :out]
        return y if x.dtype == torch.float32 else y.to(x.dtype)
    a, t, p = input_codes(m, x.reshape(-1, k))  # int8 (M, in); scale (M, 1) or (1, 1); offset or None
    return from_codes(m, st, a, t, p, repeat).to(x.dtype).reshape(*x.shape[:-1], out)


def from_codes(m: QuantLinear, st: dict, a: torch.Tensor, t: torch.Tensor, p: torch.Tensor | None,
               repeat: int = 1) -> torch.Tensor:
    """The layer's float32 output ``(M, out)`` for input codes ``x ~ (a + p) * t``
    (:func:`lowbit.kernels.int8.input_codes`); ``repeat`` as in :func:`linear`."""
    xu = (a.view(torch.uint8) ^ 128).contiguous()  # a + 128
    return finish(m, st, product(st, xu, st["n"], repeat), t, p)


def finish(m: QuantLinear, st: dict, y: torch.Tensor, t: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """The layer's float32 output ``(M, out)`` from the integer product ``y`` float32 ``(M, n)``: the
    asymmetric-activation term ``p * wsum``, the activation scale ``t``, the bias."""
    if p is not None:
        y += p.float() * st["wsum"]  # (M, 1) * (n,)
    y.mul_(t)
    y = y[:, :m.out_features]  # the rows padding added
    if m.bias is not None:
        y += m.bias.float()
    return y


def product(st: dict, xu: torch.Tensor, n: int, repeat: int = 1) -> torch.Tensor:
    """``y[m, n] = sum_g s[n, g] * sum_{k in g} a[m, k] (q[n, k] - zp[n, g])`` float32 ``(M, n)``, from the
    codes ``xu = a + 128`` uint8 ``(M, K / repeat)`` and a :func:`pack_codes` state of ``K`` columns."""
    rows, k = xu.shape
    y = torch.empty(rows, n, dtype=torch.float32)
    if rows:
        rc = native.library().lowbit_w4a8_avx2(
            xu.data_ptr(), st["weight"].data_ptr(), st["zero"].data_ptr(), st["scale"].data_ptr(),
            st["corr"].data_ptr(), y.data_ptr(), rows, n, repeat * k, k, st["group"], torch.get_num_threads())
        _check(rc, xu, f"M={rows}, N={n}, K={repeat * k}, group={st['group']}")
    return y


@functools.cache
def _linear_s8():
    """The one-call C function (looked up once: the decode path calls it for every layer and token)."""
    return native.function("lowbit_w4a8_linear_s8")


def _check(rc: int, x: torch.Tensor, shape: str) -> None:
    """Raise for a non-zero return code of the C library (3: ``x`` holds NaN/Inf; else shapes or memory)."""
    if rc == 3:
        raise InputError(f"activation of shape {tuple(x.shape)} holds NaN/Inf value(s)")
    if rc != 0:
        raise RuntimeError(f"lowbit's W4A8 kernel refused {shape} (code {rc})")


# scale formats the C quantizer rounds to exactly as lowbit.formats.scales.round_scale does
_NATIVE_SCALES = {"fp16": 1, "fp32": 0}


def native_codes(x2: torch.Tensor, act) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes ``a + 128`` uint8 ``(M, K)`` and scales float32 ``(M, 1)`` of ``x2`` by lowbit's C quantizer: the
    ones the one-call path computes inside C (the same ``quantize_row``), exposed so that they can be checked
    against lowbit's own quantizer. ``act`` must be one the C quantizer takes (:func:`_native_scale`)."""
    half = _native_scale(act)
    if half is None:
        raise InputError(f"lowbit's C quantizer takes symmetric int8 per-token activations with fp16 or fp32 "
                         f"scales and no clipping, not {act.name}")
    xf = x2.float().contiguous()
    rows, k = xf.shape
    codes = torch.empty(rows, k, dtype=torch.uint8)
    scale = torch.empty(rows, 1, dtype=torch.float32)
    rc = native.library().lowbit_quantize_rows_s8(xf.data_ptr(), codes.data_ptr(), scale.data_ptr(), rows, k, half,
                                                  torch.get_num_threads())
    _check(rc, x2, f"M={rows}, K={k}")
    return codes, scale


def _native_scale(act) -> int | None:
    """The C quantizer's scale flag (1: fp16, 0: fp32) when it makes ``act``'s codes (symmetric int8 per token,
    no clipping, fp16 or fp32 scales), else None."""
    spec = act.spec
    if spec.has_zero_point or spec.granularity != "token" or act.clip != 1.0:
        return None
    return _NATIVE_SCALES.get(spec.scale_format)


def dequantized_rows(st: dict, k: int, n0: int, n1: int) -> torch.Tensor:
    """Rows ``[n0, n1)`` of the float32 weight ``(n1 - n0, k)`` of a :func:`pack_codes` state: ``(q - zp) * s``,
    the reference path's values exactly."""
    w = torch.empty(n1 - n0, k, dtype=torch.float32)
    rc = native.library().lowbit_w4_dequant(st["weight"].data_ptr(), st["zero"].data_ptr(), st["scale"].data_ptr(),
                                            w.data_ptr(), st["n"], k, st["group"], n0, n1, torch.get_num_threads())
    if rc:
        raise RuntimeError(f"lowbit's 4-bit unpacking refused rows {n0}..{n1} of N={st['n']}, K={k}, "
                           f"group={st['group']} (code {rc})")
    return w


def float_product(m: QuantLinear, st: dict, x2: torch.Tensor) -> torch.Tensor:
    """``x2`` float32 ``(M, in)`` times the layer's weight unpacked to float32 (a slice of rows at a time:
    ``lowbit.kernels.dequant``), plus the bias: float32 ``(M, out)``."""
    return sliced_linear(x2, lambda n0, n1: dequantized_rows(st, m.in_features, n0, n1), m.out_features, m.bias)

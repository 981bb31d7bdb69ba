"""8-bit integer linears: weight-only (torch's int8 CPU matmul) and W8A8 (``torch._int_mm``, VNNI).

lowbit stores 8-bit integer codes as uint8 ``q`` with ``w = (q - zp) * s`` (``zp = 128`` when symmetric).
Both kernels use the signed codes ``c = q - 128`` (int8), so ``w = (c + o) * s`` with the per-row offset
``o = 128 - zp`` (zero when symmetric), and add the offset's share separately.

Weight-only (per channel): ``y = (x @ c.T) * s + rowsum(x) * (o * s)``. The product runs in bf16 (torch's
kernel with unit scales), the scales and the offset term in float32. Calls with more than :data:`DEQUANT_ROWS`
rows (a long prompt, an encoder's frames) multiply by the weight dequantized to float32 instead, in torch's float
product, which is faster there (and exact to float32 rounding).

W8A8 (per-channel weights; dynamic per-token or per-tensor activations, or a static calibrated per-tensor
range of at most 8 bits): the activation is quantized by lowbit's own quantizer (the same codes as the
reference path), ``x = (a + p) * t`` with signed codes ``a`` and offset ``p = 128 - zx``, and

    sum_k x_k w_nk = t * s_n * (sum_k a_k c_nk + o_n sum_k a_k + p sum_k c_nk + K p o_n)

where the first term is one int8 x int8 -> int32 product and the rest are integer corrections (the weight
column sums precomputed once): exact in int32, so only the final float scaling rounds.
"""

from __future__ import annotations

import torch

from lowbit.errors import InputError
from lowbit.formats import default_range, quantize
from lowbit.formats.elements import element_max
from lowbit.formats.scales import round_scale
from lowbit.kernels.checks import int_linear_why_not
from lowbit.nn.base import QuantModule
from lowbit.nn.linear import QuantLinear
from lowbit.spec import QuantSpec


def _signed_codes(codes: torch.Tensor) -> torch.Tensor:
    return (codes.to(torch.int16) - 128).to(torch.int8)


def _int8_channel_weight(m: QuantModule) -> str | None:
    return int_linear_why_not(m, 8, ("channel",))


def _weight(m: QuantLinear) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Signed codes int8 ``(out, in)``, scale float32 ``(out,)``, offset ``128 - zp`` int32 ``(out,)``."""
    q = m.quantized_weight()
    scale = (q.scale if q.global_scale is None else q.scale * q.global_scale).reshape(-1)
    offset = (128 - q.zero_point.to(torch.int32)).reshape(-1) if q.zero_point is not None \
        else torch.zeros_like(scale, dtype=torch.int32)
    return _signed_codes(q.codes).contiguous(), scale.float(), offset


# ---- weight-only ----------------------------------------------------------------------------------


def weight_only_why_not(m: QuantModule) -> str | None:
    why = _int8_channel_weight(m)
    if why is None and m.act is not None:
        why = f"its activations are quantized ({m.act.name}); this kernel is weight-only"
    if why is None and m.in_features % 16:  # torch 2.13's kernel reads out of bounds otherwise (it crashes)
        why = f"in_features {m.in_features} is not a multiple of 16"
    return why


def weight_only_pack(m: QuantLinear) -> dict:
    c, s, o = _weight(m)
    st = {"weight": c, "scale": s, "ones": torch.ones(m.out_features, dtype=torch.bfloat16)}
    if bool(o.any()):
        st["offset"] = o.float() * s  # (out,)
        st["code_offset"] = o.contiguous()  # (out,) int32: w = (c + o) * s
    return st


# weight-only calls with more rows than this multiply by the weight dequantized to float32 (torch's float product):
# torch's bf16 int8 kernel is slower than that beyond a crossover between 16 and 64 rows on an AVX2 EPYC
# (benchmarks/linear_kernels.py with and without --dequant-rows)
DEQUANT_ROWS = 32


def weight_only_run(m: QuantLinear, st: dict, x: torch.Tensor) -> torch.Tensor:
    x2 = x.reshape(-1, m.in_features)
    if x2.shape[0] > DEQUANT_ROWS:
        from lowbit.kernels.dequant import sliced_linear

        y = sliced_linear(x2.float(), lambda n0, n1: dequantized_weight(st, n0, n1), m.out_features, m.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)
    y = torch.ops.aten._weight_int8pack_mm(x2.to(torch.bfloat16), st["weight"], st["ones"]).float() * st["scale"]
    if "offset" in st:
        y = y + x2.float().sum(-1, keepdim=True) * st["offset"]  # (M, 1) * (out,)
    if m.bias is not None:
        y = y + m.bias.float()
    return y.to(x.dtype).reshape(*x.shape[:-1], m.out_features)


def dequantized_weight(st: dict, n0: int = 0, n1: int | None = None) -> torch.Tensor:
    """Rows ``[n0, n1)`` (default all) of the float32 weight of a :func:`weight_only_pack` state: ``(c + o) * s``,
    the reference path's values exactly (lowbit's C++ loop where it is available, else torch)."""
    from lowbit import native  # lazy: the library is built on first use

    n1 = st["weight"].shape[0] if n1 is None else n1
    c, s = st["weight"][n0:n1], st["scale"][n0:n1]
    o = st.get("code_offset")
    o = None if o is None else o[n0:n1]
    if native.why_unavailable() is None:
        w = torch.empty(c.shape, dtype=torch.float32)
        rc = native.library().lowbit_s8_dequant(c.data_ptr(), s.data_ptr(), None if o is None else o.data_ptr(),
                                                w.data_ptr(), c.shape[0], c.shape[1], torch.get_num_threads())
        if rc:
            raise RuntimeError(f"lowbit's 8-bit unpacking refused N={c.shape[0]}, K={c.shape[1]} (code {rc})")
        return w
    w = c.to(torch.int32) if o is None else c.to(torch.int32) + o[:, None]
    return w.float().mul_(s[:, None])


# ---- W8A8 -----------------------------------------------------------------------------------------


def w8a8_why_not(m: QuantModule) -> str | None:
    why = _int8_channel_weight(m)
    return why if why is not None else act_why_not(m)


def act_why_not(m: QuantModule) -> str | None:
    """None if ``m``'s input is quantized to integers these kernels read as int8 codes: 8 bits per token or per
    tensor at run time, or a static (calibrated) per-tensor range of at most 8 bits; else why not."""
    act = m.act
    if act is None:
        return "its activations are not quantized (this kernel needs 8-bit activations)"
    a = act.spec
    if act.dynamic and (a.format != "int" or a.bits != 8 or a.granularity not in ("token", "tensor")):
        return f"activation format {a.name} is not 8-bit integer per token or per tensor"
    if not act.dynamic and (a.format != "int" or a.bits > 8 or a.granularity != "tensor"):
        return f"static activation format {a.name} is not an integer format of at most 8 bits per tensor"
    return None


def w8a8_pack(m: QuantLinear) -> dict:
    c, s, o = _weight(m)
    return {"weight": c, "scale": s, "offset": o, "colsum": c.to(torch.int32).sum(1),
            "has_offset": bool(o.any())}


def w8a8_run(m: QuantLinear, st: dict, x: torch.Tensor) -> torch.Tensor:
    a, t, p = input_codes(m, x.reshape(-1, m.in_features))
    return w8a8_from_codes(m, st, a, t, p).to(x.dtype).reshape(*x.shape[:-1], m.out_features)


def w8a8_from_codes(m: QuantLinear, st: dict, a: torch.Tensor, t: torch.Tensor, p: torch.Tensor | None
                    ) -> torch.Tensor:
    """The layer's float32 output ``(M, out)`` for input codes ``x ~ (a + p) * t`` (:func:`input_codes`)."""
    acc = torch._int_mm(a, st["weight"].t())  # (M, out) int32
    if st["has_offset"]:
        acc += a.to(torch.int32).sum(1, keepdim=True) * st["offset"]
    if p is not None:
        acc += p * (st["colsum"] + m.in_features * st["offset"])
    y = acc.float().mul_(t).mul_(st["scale"])
    if m.bias is not None:
        y += m.bias.float()
    return y


def input_codes(m: QuantModule, x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``m``'s input ``x2`` ``(M, K)`` as its activation quantizer codes it: :func:`activation_codes` of a dynamic
    quantizer, :func:`static_codes` of a calibrated one."""
    if m.act.dynamic:
        return activation_codes(x2, m.act.spec, m.act.clip)
    return static_codes(x2, m.act.spec, m.act_lo, m.act_hi)


def activation_codes(x2: torch.Tensor, spec: QuantSpec, clip: float = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``x2`` ``(M, K)`` as signed int8 codes ``a``, scale ``t`` ``(M, 1)`` or ``(1, 1)`` and, for an asymmetric
    spec, the offset ``p = 128 - zero point`` int32 ``(M, 1)`` (else None): ``x2 ~ (a + p) * t``, the codes
    lowbit's quantizer gives (with the range times ``clip``, as ``fake_quantize_dynamic``)."""
    if not spec.has_zero_point:
        a, t = symmetric_codes(x2, spec, clip)
        return a, t, None
    if clip == 1.0:
        qx = quantize(x2, spec)  # codes uint8 (M, in); scale / zero point (M, 1) or (1, 1)
    else:
        lo, hi = default_range(x2.float(), spec)
        qx = quantize(x2, spec, lo * clip, hi * clip)
    t = qx.scale if qx.global_scale is None else qx.scale * qx.global_scale
    return _signed_codes(qx.codes), t, 128 - qx.zero_point.to(torch.int32)


def static_codes(x2: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x2`` ``(M, K)`` in the codes of a static per-tensor range ``[lo, hi]`` (integers of at most 8 bits), as
    :func:`activation_codes` returns them: signed int8 ``a``, scale ``t`` ``(1, 1)`` and offset ``p`` int32
    ``(1, 1)`` with ``x2 ~ (a + p) * t``. Codes of fewer bits or without a zero point are shifted so that ``p``
    covers both (``a + p`` = the stored code minus its zero point)."""
    qx = quantize(x2, spec, lo, hi)  # codes uint8 (M, K), one tile: the reference path's codes
    t = (qx.scale if qx.global_scale is None else qx.scale * qx.global_scale).reshape(1, 1).float()
    zp = qx.zero_point.to(torch.int32).reshape(1, 1) if qx.zero_point is not None \
        else torch.full((1, 1), 2 ** (spec.bits - 1), dtype=torch.int32)
    return _signed_codes(qx.codes), t, 128 - zp


def symmetric_codes(x: torch.Tensor, spec: QuantSpec, clip: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes of ``x`` ``(M, K)`` per token or per tensor, as signed int8, and the scale
    ``(M, 1)`` or ``(1, 1)`` float32: the same codes and scale as ``lowbit.formats.quantize`` (its scale
    rule and rounding), in fewer passes over ``x``; it is the hot path of every W8A8 product."""
    xf = x.float()
    amax = xf.abs().amax(-1, keepdim=True) if spec.granularity == "token" else xf.abs().amax().reshape(1, 1)
    if not bool(torch.isfinite(amax).all()):
        raise InputError(f"activation of shape {tuple(x.shape)} holds NaN/Inf value(s)")
    if clip != 1.0:
        amax = amax * clip
    emax = element_max(spec.format, spec.bits)
    scale = round_scale(amax / emax, spec.scale_format, emax)  # (M, 1) or (1, 1)
    safe = torch.where(scale > 0, scale, torch.ones_like(scale))
    return xf.div(safe).round_().clamp_(-128, 127).to(torch.int8), scale

"""W4A8: 4-bit integer weights x 8-bit activations, as int8 x int8 -> int32 products (``torch._int_mm``).

lowbit stores 4-bit integer codes ``q`` in 0..15 with ``w = (q - zp) * s`` per group (``zp = 8`` when
symmetric). The kernel keeps the signed codes ``c = q - 8`` in -8..7 as int8, laid out per group as
``(groups, group_size, out)``, and ``o = 8 - zp`` per group and output (zero when symmetric), so that
``w = (c + o) * s`` (a row whose length the group size does not divide ends in a shorter group, as stored). The
activation is quantized exactly as the W8A8 kernel does
(``lowbit.kernels.int8``: ``x = (a + p) * t``, per token or per tensor), and for each group ``g``

    sum_{k in g} x_k w_nk = t * s_gn * (sum_k a_k c_nk + o_gn sum_k a_k + p sum_k c_nk + |g| p o_gn)

whose first term is one int8 x int8 -> int32 product per group and the rest exact integer corrections (the
weight's column sums precomputed once); the float part is only ``t * s_gn`` per group. Per-channel weights are
one group of the whole row, one product. The widened codes take one byte per weight in memory (as W8A8's do),
twice the packed 4-bit storage; the saved artifact keeps 4 bits. Exact to float32 rounding against the
reference path (which dequantizes and multiplies in float).
"""

from __future__ import annotations

import torch

from lowbit.kernels.checks import int_linear_why_not
from lowbit.kernels.int8 import act_why_not, input_codes
from lowbit.nn.base import QuantModule
from lowbit.nn.linear import QuantLinear


def why_not(m: QuantModule) -> str | None:
    why = int_linear_why_not(m, 4, ("group", "channel"))
    if why is not None:
        return why
    why = act_why_not(m)
    if why is not None:
        return why
    g = group_width(m.spec, m.in_features)
    last = m.in_features - (group_count(m.in_features, g) - 1) * g
    if g % 8 or last % 8 or m.out_features % 8:
        return (f"group size {g}, last group {last} and out_features {m.out_features} must be multiples of 8 "
                f"(torch._int_mm)")
    return None


def group_width(spec, in_features: int) -> int:
    """Columns per stored scale: the group size, or the whole row (per channel, or one group longer than it)."""
    return min(spec.group_size, in_features) if spec.granularity == "group" else in_features


def group_count(in_features: int, g: int) -> int:
    return -(-in_features // g)


def pack(m: QuantLinear) -> dict:
    """Per group ``i``: ``weight[i]`` int8 ``(width_i, out)``, ``colsum[i]`` int32 ``(out,)``; ``scale`` float32
    ``(groups, out)``; ``offset`` int32 ``(groups, out)`` or None; ``bounds``: each group's columns."""
    q = m.quantized_weight()
    n, k = m.weight_shape
    g = group_width(m.spec, k)
    scale = (q.scale if q.global_scale is None else q.scale * q.global_scale).float()  # (out, groups)
    c = (q.codes.to(torch.int16) - 8).to(torch.int8)  # (out, in) in -8..7
    bounds = [(i * g, min(k, (i + 1) * g)) for i in range(group_count(k, g))]
    weight = [c[:, a:b].t().contiguous() for a, b in bounds]  # (width, out) each
    offset = (8 - q.zero_point.to(torch.int32)).t().contiguous() if q.zero_point is not None else None  # (groups, out)
    return {"weight": weight, "scale": scale.t().contiguous(), "offset": offset, "bounds": bounds,
            "colsum": [w.to(torch.int32).sum(0) for w in weight]}


def run(m: QuantLinear, st: dict, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., in)`` (already through the layer's input transforms) -> ``(..., out)`` in ``x``'s dtype."""
    a, t, p = input_codes(m, x.reshape(-1, m.in_features))  # int8 (M, in); scale (M, 1) or (1, 1); offset or None
    return from_codes(m, st, a, t, p).to(x.dtype).reshape(*x.shape[:-1], m.out_features)


def from_codes(m: QuantLinear, st: dict, a: torch.Tensor, t: torch.Tensor, p: torch.Tensor | None) -> torch.Tensor:
    """The layer's float32 output ``(M, out)`` for input codes ``x ~ (a + p) * t``
    (:func:`lowbit.kernels.int8.input_codes`)."""
    whole = len(st["bounds"]) == 1
    y = None
    for i, (lo, hi) in enumerate(st["bounds"]):
        ai = a if whole else a[:, lo:hi].contiguous()  # (M, width)
        acc = torch._int_mm(ai, st["weight"][i])  # (M, out) int32
        if st["offset"] is not None:
            acc += ai.to(torch.int32).sum(1, keepdim=True) * st["offset"][i]
        if p is not None:
            o = st["offset"][i] if st["offset"] is not None else 0
            acc += p * (st["colsum"][i] + (hi - lo) * o)
        part = acc.float().mul_(st["scale"][i])
        y = part if y is None else y.add_(part)
    y = y.mul_(t)
    if m.bias is not None:
        y += m.bias.float()
    return y

"""4-bit integer weight-only linear through torch's CPU int4 matrix product.

``torch.ops.aten._weight_int4pack_mm_for_cpu(x, W, group, scale_zeros)`` computes ``x @ dequant(W).T`` with
``dequant(W)[n, k] = (q[n, k] - 8) * s[g, n] + z[g, n]`` (``g = k // group``), reading the packed 4-bit
codes directly (bf16 activations; with fp32 ones it is many times slower). lowbit's integers are
``(q - zp) * s`` (``zp = 8`` when symmetric), which is that formula with ``z = (8 - zp) * s``.

The kernel takes groups of 32, 64, 128 or 256 columns. A lowbit group size (or a whole row, per channel)
that is a multiple of one of those, with ``in_features`` also a multiple of it, is given to the kernel as
that smaller group with each stored scale repeated, which is exact; this also covers a shorter last group
(576 inputs in groups of 128 run as groups of 64). The kernel needs output rows in multiples of
:data:`ROW_BLOCK`: a layer of any other width (a vocabulary head of 51,865 rows) is packed with rows of zero
scale added, and the output cut back. Numerics: activations, scales and the ``z`` terms are
bf16 inside the kernel, so results match the reference path to bf16 precision, not bit for bit.
"""

from __future__ import annotations

import torch

from lowbit.kernels.checks import int_linear_why_not
from lowbit.nn.base import QuantModule
from lowbit.nn.linear import QuantLinear
from lowbit.spec import QuantSpec

KERNEL_GROUPS = (256, 128, 64, 32)
ROW_BLOCK = 16


def kernel_group(spec: QuantSpec, in_features: int) -> int | None:
    """The kernel group size that reproduces ``spec``'s groups on ``in_features`` inputs, or None."""
    g = spec.group_size if spec.granularity == "group" else in_features
    for kg in KERNEL_GROUPS:
        if g % kg == 0 and in_features % kg == 0:
            return kg
    return None


def why_not(m: QuantModule) -> str | None:
    why = int_linear_why_not(m, 4, ("group", "channel"))
    if why is not None:
        return why
    spec = m.spec
    if m.act is not None:
        return f"its activations are quantized ({m.act.name}); this kernel is weight-only"
    if kernel_group(spec, m.in_features) is None:
        g = spec.group_size if spec.granularity == "group" else m.in_features
        return f"no group of {KERNEL_GROUPS} divides both the group size {g} and in_features {m.in_features}"
    return None


def pack(m: QuantLinear) -> dict:
    """``weight``: the kernel's packed uint8 codes; ``scale_zeros``: bf16 ``(in // group, n, 2)``, ``n`` the
    output rows rounded up to :data:`ROW_BLOCK`."""
    q = m.quantized_weight()
    n, k = m.weight_shape
    kg = kernel_group(m.spec, k)
    g = m.spec.group_size if m.spec.granularity == "group" else k
    scale = q.scale if q.global_scale is None else q.scale * q.global_scale  # (out, stored groups) float32
    zp = q.zero_point.float() if q.zero_point is not None else torch.full_like(scale, 8.0)
    idx = torch.arange(k // kg) * kg // g  # stored group of each kernel group
    s, z = scale[:, idx], zp[:, idx]  # (out, in // kg)
    codes = q.codes
    pad = -n % ROW_BLOCK
    if pad:  # rows of zero scale and zero offset: they compute zeros, cut off in run()
        s, z, codes = (torch.nn.functional.pad(t, (0, 0, 0, pad)) for t in (s, z, codes))
    scale_zeros = torch.stack([s.t(), ((8.0 - z) * s).t()], dim=-1).to(torch.bfloat16).contiguous()
    weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return {"weight": weight, "scale_zeros": scale_zeros, "group": kg}


def run(m: QuantLinear, st: dict, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., in)`` any float dtype -> ``(..., out)`` in ``x``'s dtype."""
    x2 = x.reshape(-1, m.in_features).to(torch.bfloat16)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, st["weight"], st["group"], st["scale_zeros"])
    y = y[:, :m.out_features].to(x.dtype)
    if m.bias is not None:
        y = y + m.bias.to(x.dtype)
    return y.reshape(*x.shape[:-1], m.out_features)

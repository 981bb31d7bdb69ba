"""W8A8 on lowbit's AVX2 kernel, for CPUs without VNNI: each 8-bit weight code as two 4-bit ones.

An 8-bit code ``q`` in 0..255 with zero point ``zp`` splits exactly into nibbles, ``q = 16 h + l`` and
``zp = 16 zh + zl``, so ``q - zp = 16 (h - zh) + (l - zl)``. A per-channel 8-bit layer of ``K`` inputs is
therefore a 4-bit layer of ``2K`` inputs in two groups of ``K``: the high nibbles with scale ``16 s`` and zero
point ``zh``, the low ones with scale ``s`` and ``zl``, fed the same activation codes twice. The W4A8 kernel
(``lowbit.kernels.w4a8_avx2``) sums each group exactly in integers, so the result is exact to float32
rounding, and the weight stays one byte per value in memory.

Twice the W4A8 kernel's work, so this kernel is for CPUs where ``torch._int_mm`` is slow: without VNNI it
runs at a few GMAC/s, 3x slower than fp32 at batch 1 and 18x at batch 128 (AVX2-only EPYC, 4096x4096).
With VNNI (or AMX) the dispatch keeps ``w8a8-int-mm``, which is faster there.
"""

from __future__ import annotations

import torch

from lowbit import cpu_features, native
from lowbit.kernels import w4a8_avx2
from lowbit.kernels.int8 import act_why_not
from lowbit.kernels.checks import int_linear_why_not
from lowbit.nn.base import QuantModule
from lowbit.nn.linear import QuantLinear


def why_not(m: QuantModule) -> str | None:
    why = int_linear_why_not(m, 8, ("channel",)) or act_why_not(m)
    if why is not None:
        return why
    if m.in_features % w4a8_avx2.CHUNK:
        return f"in_features {m.in_features} must be a multiple of 32"
    if cpu_features.has_vnni():
        return "this CPU has VNNI, where w8a8-int-mm (torch._int_mm) is the faster 8-bit product"
    return native.why_unavailable()


def pack(m: QuantLinear) -> dict:
    q = m.quantized_weight()
    n, k = m.weight_shape
    scale = (q.scale if q.global_scale is None else q.scale * q.global_scale).float().reshape(n, 1)
    zp = q.zero_point.reshape(n, 1) if q.zero_point is not None else torch.full((n, 1), 128, dtype=torch.uint8)
    codes = torch.cat([q.codes >> 4, q.codes & 15], 1)  # (out, 2 * in): high nibbles, then low ones
    zero = torch.cat([zp >> 4, zp & 15], 1)  # (out, 2)
    return w4a8_avx2.pack_codes(codes, zero, torch.cat([scale * 16, scale], 1), k)


def run(m: QuantLinear, st: dict, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., in)`` (already through the layer's input transforms) -> ``(..., out)`` in ``x``'s dtype."""
    return w4a8_avx2.linear(m, st, x, repeat=2)  # both nibble groups read the same activation codes

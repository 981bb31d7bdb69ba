"""8-bit per-channel integer weight-only linears on lowbit's AVX2 kernel, in float32.

The weight stays one signed byte a value (``lowbit.kernels.int8``'s layout: ``w = (c + o) * s``, offset ``o`` per
row for asymmetric codes), and the activations stay float32, so the result is the reference path's up to float32
rounding order (no bf16 step, unlike ``int8-weight-bf16``). Few rows (decode, a short prompt:
:data:`DEQUANT_ROWS` or fewer): ``lowbit_s8_linear_f32`` (``csrc/weight_only_avx2.cpp``) in one C call, bias
included; more rows: the weight dequantized to float32 a slice of rows at a time for torch's float product
(``lowbit.kernels.dequant``).
"""

from __future__ import annotations

import functools

import torch

from lowbit import native
from lowbit.kernels import int8
from lowbit.kernels.checks import check_width
from lowbit.kernels.dequant import sliced_linear
from lowbit.nn.base import QuantModule
from lowbit.nn.linear import QuantLinear

# calls with more rows than this take the float32 weight: the crossover lies between 16 and 64 rows on an AVX2 EPYC
# (benchmarks/linear_kernels.py with and without --dequant-rows)
DEQUANT_ROWS = 32


def why_not(m: QuantModule) -> str | None:
    why = int8.weight_only_why_not(m)
    if why is not None and "multiple of 16" not in why:  # this kernel needs multiples of 8 only
        return why
    if m.in_features % 8:
        return f"in_features {m.in_features} is not a multiple of 8"
    return native.why_unavailable()


def pack(m: QuantLinear) -> dict:
    """Signed codes int8 ``(out, in)``, scale float32 ``(out,)`` and, for asymmetric codes, ``code_offset``
    int32 ``(out,)`` (see :func:`lowbit.kernels.int8.dequantized_weight`)."""
    c, s, o = int8._weight(m)
    st = {"weight": c, "scale": s.contiguous()}
    if bool(o.any()):
        st["code_offset"] = o.contiguous()
    return st


def run(m: QuantLinear, st: dict, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., in)`` (already through the layer's input transforms) -> ``(..., out)`` in ``x``'s dtype."""
    k, out = m.in_features, m.out_features
    check_width(x, k)
    rows = x.numel() // k if k else 0
    if rows > DEQUANT_ROWS:
        y = sliced_linear(x.reshape(rows, k).float(), lambda n0, n1: int8.dequantized_weight(st, n0, n1), out,
                          m.bias)
        return y.to(x.dtype).reshape(*x.shape[:-1], out)
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    y = torch.empty(*x.shape[:-1], out)
    if rows:
        b = m.bias
        if b is not None and (b.dtype != torch.float32 or not b.is_contiguous()):
            b = b.float().contiguous()
        o = st.get("code_offset")
        rc = _linear()(xf.data_ptr(), st["weight"].data_ptr(), st["scale"].data_ptr(),
                       None if o is None else o.data_ptr(), None if b is None else b.data_ptr(), y.data_ptr(), rows,
                       out, k, torch.get_num_threads())
        if rc:
            raise RuntimeError(f"lowbit's 8-bit float kernel refused M={rows}, N={out}, K={k} (code {rc})")
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@functools.cache
def _linear():
    """The C function (looked up once: the decode path calls it for every layer and token)."""
    return native.function("lowbit_s8_linear_f32")

"""4-bit integer weight-only linears on lowbit's AVX2 kernels, in float32.

The weight stays packed two codes a byte in the layout every 4-bit kernel here shares
(:func:`lowbit.kernels.w4a8_avx2.pack_codes`, about 4.3 bits a weight with its scales), and the activations
stay float32, so the result is the reference path's ``x @ ((q - zp) * s).T`` up to float32 rounding order (no
bf16 step, unlike ``int4-weight-bf16``). How it runs depends on how many rows (tokens) the call has:

- few rows (decode, a short prompt: :data:`DEQUANT_ROWS` or fewer): ``lowbit_w4_linear_f32``
  (``csrc/weight_only_avx2.cpp``), bias included, in one C call: one row unpacks the packed codes in registers;
  several rows unpack each block of 8 weight rows to float32 once and reuse it for every row;
- more rows (a prompt, an encoder's frames): the weight is unpacked to float32 by ``lowbit_w4_dequant``, a slice
  of rows at a time, for torch's float matrix product (``lowbit.kernels.dequant``).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from lowbit import native
from lowbit.kernels import w4a8_avx2
from lowbit.kernels.checks import check_width, int_linear_why_not
from lowbit.kernels.w4a8 import group_count, group_width
from lowbit.nn.base import QuantModule
from lowbit.nn.linear import QuantLinear

# calls with more rows than this unpack the weight to float32 and use torch's float product: the crossover lies
# between 64 and 512 rows on an AVX2 EPYC (benchmarks/linear_kernels.py with and without --dequant-rows)
DEQUANT_ROWS = 64


def why_not(m: QuantModule) -> str | None:
    why = int_linear_why_not(m, 4, ("group", "channel"))
    if why is not None:
        return why
    if m.act is not None:
        return f"its activations are quantized ({m.act.name}); this kernel is weight-only"
    k = m.in_features
    g = group_width(m.spec, k)
    last = k - (group_count(k, g) - 1) * g
    if g % w4a8_avx2.CHUNK or last % w4a8_avx2.CHUNK:
        return f"group size {g} and last group {last} must be multiples of {w4a8_avx2.CHUNK}"
    return native.why_unavailable()


def pack(m: QuantLinear) -> dict:
    """:func:`lowbit.kernels.w4a8_avx2.pack_codes` of the weight, without the W4A8 correction terms."""
    st = w4a8_avx2.pack(m)
    return {k: v for k, v in st.items() if k not in ("corr", "wsum")}


def run(m: QuantLinear, st: dict, x: torch.Tensor) -> torch.Tensor:
    """``x`` ``(..., in)`` (already through the layer's input transforms) -> ``(..., out)`` in ``x``'s dtype."""
    k, out = m.in_features, m.out_features
    check_width(x, k)
    rows = x.numel() // k if k else 0
    if rows > DEQUANT_ROWS:
        y = w4a8_avx2.float_product(m, st, x.reshape(rows, k).float())
        return y.to(x.dtype).reshape(*x.shape[:-1], out)
    # the decode path: as few torch calls as possible (each costs microseconds, as much as a small layer's product)
    xf = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
    n = st["n"]
    y = torch.empty(*x.shape[:-1], n)
    if rows:
        bias = _bias(m, n)
        rc = _linear()(xf.data_ptr(), st["weight"].data_ptr(), st["zero"].data_ptr(), st["scale"].data_ptr(),
                        None if bias is None else bias.data_ptr(), y.data_ptr(), rows, n, k, st["group"],
                        torch.get_num_threads())
        if rc:
            raise RuntimeError(f"lowbit's 4-bit float kernel refused M={rows}, N={n}, K={k}, group={st['group']} "
                               f"(code {rc})")
    if n != out:
        y = y[..., :out]
    return y if x.dtype == torch.float32 else y.to(x.dtype)


@functools.cache
def _linear():
    """The C function (looked up once: the decode path calls it for every layer and token)."""
    return native.function("lowbit_w4_linear_f32")


def _bias(m: QuantLinear, n: int) -> torch.Tensor | None:
    """The bias as float32, contiguous, zero-padded to the kernel's ``n`` rows (None without one)."""
    b = m.bias
    if b is None:
        return None
    if b.dtype != torch.float32 or not b.is_contiguous():
        b = b.float().contiguous()
    return b if b.numel() == n else F.pad(b, (0, n - b.numel()))

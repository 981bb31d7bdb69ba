"""The classifier end of an int8 CNN graph: global average pooling on uint8 codes and the integer linear after it.

A CNN classifier ends ``conv -> [BatchNorm] -> clipped activation -> global average pool -> flatten ->
[dropout] -> linear``. When that linear has static per-tensor integer activations and runs one of lowbit's
integer-activation kernels (:data:`LINEAR_KERNELS`), :func:`lowbit.kernels.conv_graph.int8_conv_graph` makes
the whole end integer: the convolution writes uint8 codes spanning its activation's clip range (ReLU6: 0..6)
with as many bits as the linear's input, :class:`CodeMeanPool` averages the codes in int32 and requantizes the
mean once to the linear's own input codes (its calibrated scale and zero point; rounding half up), as integer
runtimes' mean does, the flatten and dropout pass the codes through, and :class:`Int8LinearCodes` multiplies
them without a float round trip. The result differs from the reference path (pool in float, then quantize) by
the rounding of each element to the convolution's codes before the average, and that requantization.

The pooled values' range is narrower than the unpooled ones', so the linear's own scale cannot code the
convolution's output: that needs a range of its own, which a clipped activation gives. After an unbounded one
(ReLU, none, a ReLU after a residual add: a ResNet's end) the pool and the linear stay as they are, and the
report says why.

The pattern is matched on the ``torch.fx`` graph: a pool is ``nn.AdaptiveAvgPool2d(1)``,
``F.adaptive_avg_pool2d(x, 1)`` or ``x.mean((2, 3))`` / ``torch.mean(x, (-2, -1))``; between it and the
linear only ``flatten`` / ``view`` / ``reshape`` and ``nn.Flatten`` / ``nn.Dropout`` / ``nn.Identity`` (eval
mode), each the only user of the one before (reads of the shape, ``x.size(0)``, aside).
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InputError
from lowbit.kernels import int8, w4a8, w4a8_avx2
from lowbit.kernels.conv_int8 import input_qparams
from lowbit.nn.base import KERNEL_ATTR
from lowbit.nn.linear import QuantLinear

# integer-activation linear kernels that take codes directly: name -> (m, state, a, t, p) -> float32 (M, out)
LINEAR_KERNELS = {
    "w8a8-int-mm": int8.w8a8_from_codes,
    "w4a8-int-mm": w4a8.from_codes,
    "w8a8-avx2": lambda m, st, a, t, p: w4a8_avx2.from_codes(m, st, a, t, p, repeat=2),
    "w4a8-avx2": w4a8_avx2.from_codes,
}
_PASS_MODULES = (nn.Flatten, nn.Dropout, nn.Identity)
_PASS_METHODS = ("view", "reshape", "flatten")
_PASS_FUNCTIONS = (torch.flatten, torch.reshape)


def codes_reader_state(linear: QuantLinear) -> dict:
    """``linear``'s input codes in the keys of the int8 convolution's state: ``x_scale``, ``x_zp`` (uint8 codes)
    and ``x_bits``."""
    t, zp = input_qparams(linear)
    return {"x_scale": t, "x_zp": zp, "x_bits": linear.act.spec.bits}


def pool_input_state(bounds: tuple[float, float], bits: int) -> dict:
    """Codes of ``bits`` bits spanning ``bounds`` (the producer's clip, widened to contain 0), in the keys of
    :func:`codes_reader_state`."""
    lo, hi = min(bounds[0], 0.0), max(bounds[1], 0.0)
    qmax = 2**bits - 1
    t = (hi - lo) / qmax
    return {"x_scale": t, "x_zp": int(round(-lo / t)), "x_bits": bits}


def why_not_codes(linear: nn.Module) -> str | None:
    """None if ``linear`` can read uint8 codes (static integer activations on a kernel of :data:`LINEAR_KERNELS`)."""
    if not isinstance(linear, QuantLinear):
        return f"a {type(linear).__name__}, not a quantized linear"
    if linear.act is None or linear.act.dynamic:
        return "its input is not quantized statically"
    packed = linear.__dict__.get(KERNEL_ATTR)
    if packed is None or packed.kernel.name not in LINEAR_KERNELS:
        return f"it runs {packed.kernel.name if packed else 'the reference path'}, not an integer-activation kernel"
    return None


def pooled_linear(pool: fx.Node, modules: dict[str, nn.Module]) -> tuple[list[fx.Node], fx.Node] | None:
    """If ``pool`` is a global average pool whose output reaches a linear that reads codes
    (:func:`why_not_codes`) through pass-through nodes only, ``(pass-through nodes, linear node)``; else None."""
    if pool_keepdim(pool, modules) is None:
        return None
    passes, cur = [], pool
    while True:
        users = list(cur.users)
        users = [u for u in users if not _reads_shape(u)]
        if len(users) != 1 or not users[0].args or users[0].args[0] is not cur:
            return None
        u = users[0]
        m = modules.get(u.target) if u.op == "call_module" else None
        if isinstance(m, _PASS_MODULES) and not m.training \
                or u.op == "call_method" and u.target in _PASS_METHODS \
                or u.op == "call_function" and u.target in _PASS_FUNCTIONS:
            passes.append(u)
            cur = u
            continue
        if m is not None and why_not_codes(m) is None and len(u.args) == 1 and not u.kwargs:
            return passes, u
        return None


def _reads_shape(n: fx.Node) -> bool:
    """``x.size(...)`` / ``x.shape``: a use that reads no values."""
    return n.op == "call_method" and n.target == "size" or \
        n.op == "call_function" and n.target is getattr and n.args[1:] == ("shape",)


def pool_keepdim(n: fx.Node, modules: dict[str, nn.Module]) -> bool | None:
    """Whether ``n`` is a global average pool over the last two dimensions keeping them (True: ``(N, C, 1, 1)``)
    or not (False: ``(N, C)``); None if it is not one."""
    if n.op == "call_module":
        m = modules.get(n.target)
        ok = type(m) is nn.AdaptiveAvgPool2d and m.output_size in (1, (1, 1), [1, 1])
        return True if ok else None
    if n.op == "call_function" and n.target is F.adaptive_avg_pool2d:
        size = n.args[1] if len(n.args) > 1 else n.kwargs.get("output_size")
        return True if size in (1, (1, 1), [1, 1]) else None
    if n.op == "call_method" and n.target == "mean" or n.op == "call_function" and n.target is torch.mean:
        dims = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim")
        if isinstance(dims, (tuple, list)) and sorted(dims) in ([2, 3], [-2, -1]) and len(n.args) <= 2 \
                and set(n.kwargs) <= {"dim", "keepdim"}:
            return bool(n.kwargs.get("keepdim", False))
    return None


class CodeMeanPool(nn.Module):
    """Global average of uint8 codes ``(N, C, H, W)`` of ``in_q = (scale, zero_point)``: int32 sums, then the mean
    requantized once to ``out_q = (scale, zero_point, largest code)`` (rounding half up, saturating), uint8 out."""

    def __init__(self, keepdim: bool, in_q: tuple[float, int], out_q: tuple[float, int, int]) -> None:
        super().__init__()
        self.keepdim, self.in_q, self.out_q = keepdim, in_q, out_q

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        if codes.dtype != torch.uint8 or codes.dim() != 4:
            raise InputError(f"{type(self).__name__} expected uint8 codes (N, C, H, W), got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        (t1, z1), (t2, z2, qmax) = self.in_q, self.out_q
        s = codes.sum((2, 3), dtype=torch.int32, keepdim=self.keepdim)  # exact
        count = codes.shape[2] * codes.shape[3]
        y = (s.double() - count * z1) * (t1 / (t2 * count)) + z2  # (N, C): float64 is cheap at this size
        return torch.floor(y + 0.5).clamp_(0, qmax).to(torch.uint8)

    def extra_repr(self) -> str:
        return f"keepdim={self.keepdim}, in_q={self.in_q}, out_q={self.out_q}"


class Int8LinearCodes(nn.Module):
    """A quantized linear reading its input as uint8 codes of its own static quantizer, on its integer kernel."""

    def __init__(self, linear: QuantLinear) -> None:
        super().__init__()
        self.linear = linear
        st = codes_reader_state(linear)
        self.t = torch.tensor([[st["x_scale"]]], dtype=torch.float32)
        self.p = torch.tensor([[128 - st["x_zp"]]], dtype=torch.int32)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        m = self.linear
        packed = m.__dict__.get(KERNEL_ATTR)
        if packed is None or packed.kernel.name not in LINEAR_KERNELS:
            raise InputError("the classifier of this int8 graph lost its integer kernel (release_kernels, a new "
                             "weight or a move); run use_kernels and int8_conv_graph again")
        if codes.dtype != torch.uint8 or codes.shape[-1] != m.in_features:
            raise InputError(f"{type(self).__name__} expected uint8 codes (..., {m.in_features}), got {codes.dtype} "
                             f"{tuple(codes.shape)}")
        a = (codes.reshape(-1, m.in_features) ^ 128).view(torch.int8).contiguous()  # code - 128
        y = LINEAR_KERNELS[packed.kernel.name](m, packed.state, a, self.t, self.p)
        return y.reshape(*codes.shape[:-1], m.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.linear.in_features}, out_features={self.linear.out_features}"

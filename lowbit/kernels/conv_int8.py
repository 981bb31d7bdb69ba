"""8-bit convolution through oneDNN's int8 kernel (``torch.ops.onednn.qconv2d_pointwise``), float output.

For a ``QuantConv2d`` with symmetric 8-bit per-channel (or per-tensor) integer weights and static
per-tensor integer activations of 8 bits (or fewer, whose codes fit in 0..127): the input is quantized to uint8 codes with the layer's calibrated scale
and zero point (computed as the reference path computes them, so the codes are the same), oneDNN convolves
uint8 x int8 with int32 accumulation and writes ``t * s_o * acc + bias`` as float32 directly, so only
the final scaling rounds differently from the reference path. Outputs are channels-last float32.

With 8-bit activations it is exact only on CPUs with VNNI (or AMX-INT8); elsewhere oneDNN's 16-bit
saturating sums make it wrong, so ``why_not`` declines there (``lowbit.cpu_features``). Activations of
7 bits or fewer keep every code in 0..127, where two products never leave int16 (2 x 127 x 128 = 32512): exact
on any x86 CPU (PyTorch's fbgemm ``reduce_range`` uses the same bound), so a plan with ``int7-tensor`` inputs
runs the int8 kernels on AVX2-only machines too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lowbit.formats import quantize
from lowbit import cpu_features
from lowbit.nn.base import QuantModule
from lowbit.nn.conv import QuantConv2d


def why_not(m: QuantModule) -> str | None:
    if not isinstance(m, QuantConv2d):
        return f"a {type(m).__name__}, not a 2-D convolution"
    spec = m.spec
    if spec.format != "int" or spec.bits != 8 or not spec.symmetric:
        return f"weight format {spec.name} is not symmetric 8-bit integer"
    if spec.granularity not in ("channel", "tensor"):
        return f"weight granularity {spec.granularity} (needs per channel or per tensor)"
    if m.act is None or m.act.dynamic:
        return "needs static (calibrated) per-tensor activation quantization"
    a = m.act.spec
    if a.format != "int" or a.bits > 8:
        return f"activation format {a.name} is not an integer format of at most 8 bits"
    if isinstance(m.padding, str):
        return f"padding={m.padding!r} (needs explicit padding)"
    if m.input_scale is not None:
        return "it scales its input per channel (AWQ)"
    if not hasattr(torch.ops.onednn, "qconv2d_pointwise"):
        return "this torch build has no oneDNN int8 convolution"
    if a.bits == 8 and not cpu_features.has_vnni():  # 7-bit codes (0..127) are exact without VNNI
        return cpu_features.NO_VNNI
    return None


def input_qparams(m: QuantModule) -> tuple[float, int]:
    """The activation quantizer's scale and zero point in uint8 codes (symmetric: zero point 2^(bits-1))."""
    lo, hi = m.act_lo.float(), m.act_hi.float()
    q = quantize(torch.cat([lo, hi], dim=1), m.act.spec, lo, hi)  # a (1, 2) tensor: one per-tensor tile
    scale = q.scale if q.global_scale is None else q.scale * q.global_scale
    zp = 2 ** (m.act.spec.bits - 1) if q.zero_point is None else int(q.zero_point.item())
    return float(scale.item()), zp


def pack(m: QuantConv2d) -> dict:
    q = m.quantized_weight()
    out = m.out_channels
    w = (q.codes.to(torch.int16) - 128).to(torch.int8)  # (out, in // groups, kh, kw)
    w_scale = (q.scale if q.global_scale is None else q.scale * q.global_scale).reshape(-1).float()
    if w_scale.numel() == 1:
        w_scale = w_scale.expand(out).contiguous()
    t, zp = input_qparams(m)
    stride, padding, dilation = list(m.stride), list(m.padding), list(m.dilation)
    packed = torch.ops.onednn.qconv_prepack(w, w_scale, t, zp, stride, padding, dilation, m.groups, None)
    return {"weight": packed, "w_scale": w_scale, "w_zp": torch.zeros(out, dtype=torch.int64), "x_scale": t,
            "x_zp": zp, "asymmetric": m.act.spec.has_zero_point, "x_bits": m.act.spec.bits}


def input_codes(m: QuantConv2d, st: dict, x: torch.Tensor) -> torch.Tensor:
    """Float ``x`` -> the uint8 codes of the layer's input quantizer, padded as the layer pads, channels-last."""
    if m.input_padding is not None:
        x = F.pad(x, m.input_padding)
    t, zp, bits = st["x_scale"], st["x_zp"], st["x_bits"]
    # the reference quantizer's codes, computed the same way (lowbit.formats.qtensor)
    if st["asymmetric"]:
        codes = torch.round(x.float() / t + zp).clamp_(0, 2**bits - 1)
    else:
        half = 2 ** (bits - 1)
        codes = torch.round(x.float() / t).clamp_(-half, half - 1).add_(half)
    return codes.to(torch.uint8).contiguous(memory_format=torch.channels_last)


def code_range(st: dict) -> tuple[float, float]:
    """The float values the layer's input codes can represent, ``[(0 - zp) t, (qmax - zp) t]``."""
    t, zp, bits = st["x_scale"], st["x_zp"], st["x_bits"]
    return (0 - zp) * t, (2**bits - 1 - zp) * t


def pad_codes(m: QuantConv2d, st: dict, codes: torch.Tensor) -> torch.Tensor:
    """Input codes produced elsewhere (the previous int8 layer), padded with the code of 0.0 as the layer pads."""
    if m.input_padding is not None:
        codes = F.pad(codes, m.input_padding, value=st["x_zp"])
    return codes.contiguous(memory_format=torch.channels_last)


def conv_codes(m: QuantConv2d, st: dict, codes: torch.Tensor, *, w_scale: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, output: tuple[float, int, torch.dtype] = (1.0, 0, torch.float32),
               post: tuple[str, list] = ("none", [])) -> torch.Tensor:
    """oneDNN's int8 convolution of uint8 ``codes``: ``post(t * s_w * acc + bias)`` as float32, or requantized
    to uint8 with ``output = (scale, zero_point, torch.uint8)``. ``post``: ``("relu", [])`` or
    ``("hardtanh", [lo, hi])`` fused into the kernel; ``w_scale`` and ``bias`` default to the layer's own."""
    w_scale = st["w_scale"] if w_scale is None else w_scale
    return torch.ops.onednn.qconv2d_pointwise(codes, st["x_scale"], st["x_zp"], st["weight"], w_scale, st["w_zp"],
                                              bias, list(m.stride), list(m.padding), list(m.dilation), m.groups,
                                              output[0], output[1], output[2], post[0], post[1], "")


def run(m: QuantConv2d, st: dict, x: torch.Tensor) -> torch.Tensor:
    """``x`` float ``(N, C, H, W)`` -> float32 ``(N, out, H', W')``, channels-last, cast to ``x``'s dtype."""
    bias = None if m.bias is None else m.bias.float()
    return conv_codes(m, st, input_codes(m, st, x), bias=bias).to(x.dtype)

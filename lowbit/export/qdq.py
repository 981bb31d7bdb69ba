"""How lowbit's quantized modules are written as QDQ ONNX: what ONNX can hold, and the export modules.

Each quantized module is swapped (for the duration of the export, :func:`export_view`) for a small module
holding its integer codes, scales and zero points in ONNX ``DequantizeLinear`` layout; its ``DequantizeLinear``
and ``QuantizeLinear`` are two custom torch ops (``lowbit::dequantize``, ``lowbit::fake_quantize``) that
compute exactly what the ONNX operators compute and that :func:`translations` maps onto them for torch's
exporter. See :mod:`lowbit.export.onnx` for the file format and the check in onnxruntime.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InputError
from lowbit.formats import quantize
from lowbit.nn.base import QuantModule
from lowbit.nn.conv import _QuantConv
from lowbit.nn.embedding import QuantEmbedding
from lowbit.nn.linear import QuantLinear

OPSET = 21  # DequantizeLinear with block_size and UINT4
_GRANULARITIES = {QuantLinear: ("tensor", "channel", "group"), QuantEmbedding: ("tensor", "channel", "group"),
                  _QuantConv: ("tensor", "channel")}


# ---- the two custom ops the exporter translates into QDQ nodes ---------------------------------------


@torch.library.custom_op("lowbit::dequantize", mutates_args=())
def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int, block_size: int,
                bits: int) -> torch.Tensor:
    """ONNX ``DequantizeLinear`` semantics: ``(codes - zero_point) * scale``, scale per tensor (0-d), per
    ``axis`` (1-d), or blocked along ``axis`` (same rank as ``codes``, ``block_size`` elements per block)."""
    del bits  # the storage type in ONNX; the values are the same
    return (codes.float() - _broadcast(zero_point.float(), codes, axis, block_size)) \
        * _broadcast(scale, codes, axis, block_size)


@_dequantize.register_fake
def _(codes, scale, zero_point, axis, block_size, bits):
    return torch.empty(codes.shape, dtype=torch.float32, device=codes.device)


@torch.library.custom_op("lowbit::fake_quantize", mutates_args=())
def _fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """ONNX ``QuantizeLinear`` then ``DequantizeLinear`` with one scale and zero point (per tensor)."""
    q = torch.clamp(torch.round(x / scale) + zero_point.float(), 0, 2**bits - 1)
    return ((q - zero_point.float()) * scale).to(x.dtype)


@_fake_quantize.register_fake
def _(x, scale, zero_point, bits):
    return torch.empty_like(x)


def _broadcast(t: torch.Tensor, like: torch.Tensor, axis: int, block_size: int) -> torch.Tensor:
    if t.dim() == 0:
        return t
    if block_size == 0:  # per axis
        shape = [1] * like.dim()
        shape[axis] = t.shape[0]
        return t.reshape(shape)
    return t.repeat_interleave(block_size, dim=axis).narrow(axis, 0, like.shape[axis])


def translations() -> dict:
    """The custom ops' ONNX translations, for ``torch.onnx.export(custom_translation_table=...)``."""
    from onnxscript import opset21 as op
    from onnxscript import ir

    def storage(bits: int) -> int:
        return ir.DataType.UINT4 if bits <= 4 else ir.DataType.UINT8

    def dequantize(codes, scale, zero_point, axis: int, block_size: int, bits: int):
        t = storage(bits)
        return op.DequantizeLinear(op.Cast(codes, to=t), scale, op.Cast(zero_point, to=t), axis=axis,
                                   block_size=block_size)

    def fake_quantize(x, scale, zero_point, bits: int):
        zp = op.Cast(zero_point, to=storage(bits))
        return op.DequantizeLinear(op.QuantizeLinear(x, scale, zp), scale, zp)

    return {torch.ops.lowbit.dequantize.default: dequantize, torch.ops.lowbit.fake_quantize.default: fake_quantize}


# ---- what ONNX can hold ----------------------------------------------------------------------------


def why_not_onnx(module: nn.Module) -> str | None:
    """``None`` if the quantized ``module`` exports to QDQ ONNX exactly, else the reason it cannot."""
    kind = next((k for k in _GRANULARITIES if isinstance(module, k)), None)
    if kind is None:
        return f"{type(module).__name__} has no ONNX export"
    if module.storage_released:
        return "its packed weight was handed to a kernel (use_kernels(keep_reference=False)); load it again"
    spec = module.spec
    if spec.format != "int":
        return f"weight format {spec.name}: ONNX QDQ export holds integer formats only"
    if not 2 <= spec.bits <= 8:
        return f"weight format {spec.name}: ONNX QDQ export holds 2- to 8-bit integers"
    if spec.granularity not in _GRANULARITIES[kind]:
        return (f"weight format {spec.name}: {spec.granularity} scales are not representable for a "
                f"{type(module).__name__} (supported: {', '.join(_GRANULARITIES[kind])})")
    if getattr(module, "input_rotation", None) is not None:
        return (f"it rotates its input online (a Hadamard of {module.input_rotation} features), which the QDQ "
                f"export does not write yet; rotate with rotate_residual (offline only) for ONNX export")
    act = module.act
    if act is not None:
        if act.dynamic:
            return (f"dynamic activation quantization ({act.spec.name}): its scales are computed at run time, "
                    "which ONNX QuantizeLinear cannot express; export a weight-only or static-activation model")
        if act.spec.format != "int" or act.spec.bits != 8:
            return f"activation format {act.spec.name}: ONNX QDQ export holds 8-bit integer activations"
    return None


def check_onnx(model: nn.Module) -> list[tuple[str, QuantModule]]:
    """The quantized modules of ``model``; raises InputError naming every one ONNX cannot hold."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, QuantModule)]
    bad = [f"{n}: {why}" for n, m in found if (why := why_not_onnx(m)) is not None]
    if bad:
        more = f" (and {len(bad) - 8} more)" if len(bad) > 8 else ""
        raise InputError("cannot export to ONNX: " + "; ".join(bad[:8]) + more)
    return found


# ---- export modules --------------------------------------------------------------------------------


def _onnx_params(module: QuantModule, transpose: bool) -> dict[str, Any]:
    """Codes, scale and zero point in ONNX DequantizeLinear layout (``transpose``: the 2-D weight as (in, out))."""
    q = module.quantized_weight()
    spec = q.spec
    codes, scale = q.codes, q.scale.float()
    zp = q.zero_point if q.zero_point is not None else torch.full(scale.shape, 2 ** (spec.bits - 1), dtype=torch.uint8)
    axis, block = 0, 0
    if spec.granularity == "tensor":
        scale, zp = scale.reshape(()), zp.reshape(())
    elif spec.granularity == "channel":  # lowbit (out, 1)
        scale, zp = scale.reshape(-1), zp.reshape(-1)
        axis = 1 if transpose else 0
    else:  # group along the input features: lowbit (out, groups)
        block = spec.group_size
        axis = 0 if transpose else 1
        if transpose:
            scale, zp = scale.t(), zp.t()
    if transpose:
        codes = codes.t()
    return {"codes": codes.contiguous(), "scale": scale.contiguous(), "zero_point": zp.contiguous(),
            "axis": axis, "block_size": block, "bits": spec.bits}


class _Export(nn.Module):
    """Holds one quantized weight (and input quantizer) as buffers the exporter turns into initializers."""

    def __init__(self, module: QuantModule, transpose: bool) -> None:
        super().__init__()
        p = _onnx_params(module, transpose)
        for k in ("codes", "scale", "zero_point"):
            self.register_buffer(k, p[k])
        self.axis, self.block_size, self.bits = p["axis"], p["block_size"], p["bits"]
        bias = getattr(module, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        input_scale = getattr(module, "input_scale", None)
        self.register_buffer("input_scale", None if input_scale is None else input_scale.detach().float().clone())
        self.act_bits = 0
        if module.act is not None:  # static per tensor (why_not_onnx refused the rest)
            t = quantize(torch.zeros(1, 1), module.act.spec, module.act_lo, module.act_hi)
            scale = t.scale.float().reshape(())
            if not float(scale) > 0:
                raise InputError(f"{type(module).__name__}: its calibrated activation range is empty (scale 0)")
            zp = t.zero_point if t.zero_point is not None else torch.tensor(2 ** (module.act.spec.bits - 1))
            self.register_buffer("act_scale", scale)
            self.register_buffer("act_zero_point", zp.reshape(()).to(torch.uint8))
            self.act_bits = module.act.spec.bits

    def weight(self) -> torch.Tensor:
        return torch.ops.lowbit.dequantize(self.codes, self.scale, self.zero_point, self.axis, self.block_size,
                                           self.bits)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:
            x = x * self.input_scale
        if self.act_bits:
            x = torch.ops.lowbit.fake_quantize(x, self.act_scale, self.act_zero_point, self.act_bits)
        return x


class _ExportLinear(_Export):
    def __init__(self, module: QuantLinear) -> None:
        super().__init__(module, transpose=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(self.prepare_input(x.float()), self.weight())  # (..., in) @ (in, out)
        return y if self.bias is None else y + self.bias


class _ExportConv(_Export):
    def __init__(self, module: _QuantConv) -> None:
        super().__init__(module, transpose=False)
        self.ndim = module.ndim
        self.conv_args = (module.stride, module.padding, module.dilation, module.groups)
        self.input_padding = module.input_padding  # "same" padding applied before the convolution (TF style)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = F.conv2d if self.ndim == 2 else F.conv1d
        if self.input_padding is not None:
            x = F.pad(x, self.input_padding)
        return conv(self.prepare_input(x.float()), self.weight(), self.bias, *self.conv_args)

    def prepare_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_scale is not None:  # per input channel: dimension 1 of (N, C, *spatial)
            x = x * self.input_scale.reshape(-1, *([1] * self.ndim))
        if self.act_bits:
            x = torch.ops.lowbit.fake_quantize(x, self.act_scale, self.act_zero_point, self.act_bits)
        return x


class _ExportEmbedding(_Export):
    def __init__(self, module: QuantEmbedding) -> None:
        super().__init__(module, transpose=False)
        self.padding_idx = module.padding_idx

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight(), self.padding_idx)


def _export_module(m: QuantModule) -> nn.Module:
    if isinstance(m, QuantLinear):
        return _ExportLinear(m)
    if isinstance(m, _QuantConv):
        return _ExportConv(m)
    return _ExportEmbedding(m)


@contextlib.contextmanager
def export_view(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` with every quantized module swapped for its export module; swapped back on exit."""
    found = check_onnx(model)
    swapped = []
    try:
        for name, m in found:
            model.set_submodule(name, _export_module(m))
            swapped.append((name, m))
        yield model
    finally:
        for name, m in swapped:
            model.set_submodule(name, m)

"""QuantConv1d / QuantConv2d: convolutions with packed low-bit weights (reference path)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InputError
from lowbit.formats import QuantizedTensor
from lowbit.nn.base import KERNEL_ATTR, QuantModule
from lowbit.spec import ActivationQuant, QuantSpec

_CONV_FN = {1: F.conv1d, 2: F.conv2d}


class _QuantConv(QuantModule):
    """``conv(fq(x * input_scale), dequantize(W)) + b``; weight ``(out, in // groups, *kernel)``.

    Weight granularity applies to the 2-D view ``(out, in // groups * prod(kernel))``: per channel is per
    output filter. Activation quantization of a convolution's input is per tensor. ``input_scale`` (AWQ's
    ``1 / s``, one per input channel; ``has_input_scale=False``: none) multiplies the input first.
    """

    ndim: int = 2

    def __init__(
        self,
        weight_shape: tuple[int, ...],
        bias: bool,
        spec: QuantSpec,
        stride: tuple[int, ...],
        padding: tuple[int, ...] | str,
        dilation: tuple[int, ...],
        groups: int,
        act: ActivationQuant | None = None,
        input_padding: tuple[int, ...] | None = None,
        has_input_scale: bool = False,
    ) -> None:
        super().__init__()
        if len(weight_shape) != self.ndim + 2:
            raise InputError(f"{type(self).__name__} needs a {self.ndim + 2}-D weight, got shape {weight_shape}")
        if act is not None and act.spec.granularity != "tensor":
            raise InputError(f"convolution inputs are quantized per tensor, got activation spec {act.spec.name}")
        self.stride, self.padding, self.dilation, self.groups = stride, padding, dilation, int(groups)
        # zero padding applied before the convolution, in F.pad order (left, right, top, bottom), for layers
        # that pad asymmetrically (TensorFlow-style 'SAME' padding)
        self.input_padding = None if input_padding is None else tuple(int(p) for p in input_padding)
        self.out_channels = int(weight_shape[0])
        self.in_channels = int(weight_shape[1]) * self.groups
        self.kernel_size = tuple(int(k) for k in weight_shape[2:])
        self._init_storage(tuple(weight_shape), spec, act, self.in_channels if has_input_scale else None)
        self.bias = nn.Parameter(torch.zeros(self.out_channels), requires_grad=False) if bias else None

    @classmethod
    def from_float(
        cls,
        conv: nn.Module,
        q: QuantizedTensor,
        act: ActivationQuant | None = None,
        input_padding: tuple[int, ...] | None = None,
        input_scale: torch.Tensor | None = None,
    ) -> "_QuantConv":
        """Build from a float ``nn.Conv{1,2}d`` and its quantized weight; ``input_scale``: optional positive
        ``(in_channels,)`` scale the input is multiplied by first (AWQ's ``1 / s``)."""
        if getattr(conv, "padding_mode", "zeros") != "zeros":
            raise InputError(f"padding_mode={conv.padding_mode!r} is not supported; only 'zeros'")
        m = cls(tuple(conv.weight.shape), conv.bias is not None, q.spec, conv.stride, conv.padding,
                conv.dilation, conv.groups, act, input_padding, input_scale is not None)
        m.set_quantized_weight(q)
        if input_scale is not None:
            m.set_input_scale(input_scale)
        if conv.bias is not None:
            m.bias.data.copy_(conv.bias.detach().float())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.__dict__.get(KERNEL_ATTR)  # set by lowbit.kernels.use_kernels
        return self.reference(x) if fast is None else fast(self, x)

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path (dequantize, then the float convolution), the oracle for every kernel."""
        w = self.dequantized_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        if self.input_scale is not None:  # (in,) over the channel dimension of (N, C, *spatial)
            x = x * self.input_scale.to(x.dtype).reshape(-1, *([1] * self.ndim))
        if self.input_padding is not None:
            x = F.pad(x, self.input_padding)
        return _CONV_FN[self.ndim](self.quantize_input(x), w, b, self.stride, self.padding, self.dilation, self.groups)

    def layer_config(self) -> dict:
        """JSON-able constructor arguments (besides spec/act), used by save/load."""
        return {"weight_shape": list(self.weight_shape), "bias": self.bias is not None, "stride": list(self.stride),
                "padding": self.padding if isinstance(self.padding, str) else list(self.padding),
                "dilation": list(self.dilation), "groups": self.groups,
                "input_padding": None if self.input_padding is None else list(self.input_padding),
                **({"input_scale": True} if self.input_scale is not None else {})}

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, " \
               f"padding={self.padding}, groups={self.groups}, bias={self.bias is not None}, {self._describe()}"


class QuantConv1d(_QuantConv):
    ndim = 1


class QuantConv2d(_QuantConv):
    ndim = 2

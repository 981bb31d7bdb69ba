"""QuantLinear: a linear layer with a packed low-bit weight, computed through the reference path."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.formats import QuantizedTensor
from lowbit.nn.base import KERNEL_ATTR, QuantModule
from lowbit.nn.rotation import check_rotation, rotate_input
from lowbit.spec import ActivationQuant, QuantSpec


class QuantLinear(QuantModule):
    """``y = fq(rot(x) * input_scale) @ dequantize(W).T + b`` with ``W`` stored packed (see ``lowbit.nn.base``).

    Shapes: ``x`` ``(..., in_features)`` -> ``(..., out_features)``; weight ``(out_features, in_features)``;
    ``input_scale`` float32 ``(in_features,)`` or None (``has_input_scale=False``: no multiplication);
    ``rot`` the online Hadamard of ``lowbit.nn.rotation`` on blocks of ``input_rotation`` features, or none.
    Both input transforms run in :meth:`transform_input`, before the reference path or a kernel, so no kernel
    needs to know them.
    The weight is dequantized to ``x``'s dtype on each call (``reference``, the path every fast kernel is
    tested against), or once per dtype inside ``lowbit.nn.cached_weights``; after
    ``lowbit.kernels.use_kernels`` the module runs its kernel instead, where one fits.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        spec: QuantSpec,
        act: ActivationQuant | None = None,
        has_input_scale: bool = False,
        input_rotation: int | None = None,
    ) -> None:
        super().__init__()
        if input_rotation is not None:
            check_rotation(input_rotation, int(in_features), type(self).__name__)
        self.input_rotation = input_rotation
        self.in_features, self.out_features = int(in_features), int(out_features)
        self._init_storage((self.out_features, self.in_features), spec, act,
                           self.in_features if has_input_scale else None)
        self.bias = nn.Parameter(torch.zeros(self.out_features), requires_grad=False) if bias else None

    @classmethod
    def from_float(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        q: QuantizedTensor,
        act: ActivationQuant | None = None,
        input_scale: torch.Tensor | None = None,
        input_rotation: int | None = None,
    ) -> "QuantLinear":
        """Build from a float layer's ``weight`` ``(out, in)`` / ``bias`` and its quantized weight ``q``.

        ``input_scale``: optional ``(in,)`` positive scale the input is multiplied by (AWQ's ``1 / s``, with
        ``q`` quantizing ``W * s``). ``input_rotation``: the block size of an online Hadamard on the input
        (``weight`` and ``q`` are then the rotated weight, as ``lowbit.nn.rotation.RotatedLinear`` holds it).
        """
        out_features, in_features = weight.shape
        m = cls(in_features, out_features, bias is not None, q.spec, act, input_scale is not None, input_rotation)
        m.set_quantized_weight(q)
        if input_scale is not None:
            m.set_input_scale(input_scale)
        if bias is not None:
            m.bias.data.copy_(bias.detach().float())
        return m

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        fast = self.__dict__.get(KERNEL_ATTR)  # set by lowbit.kernels.use_kernels
        return self.reference(x) if fast is None else fast(self, self.transform_input(x))

    def transform_input(self, x: torch.Tensor) -> torch.Tensor:
        """The input the stored weight multiplies: rotated online (if the layer has a rotation), then times
        ``input_scale`` (if it has one). Kernels are handed this, never the raw input."""
        if self.input_rotation is not None:
            x = rotate_input(x, self.input_rotation)
        if self.input_scale is not None:
            x = x * self.input_scale.to(x.dtype)  # (..., in) * (in,)
        return x

    def reference(self, x: torch.Tensor) -> torch.Tensor:
        """The reference path (input transforms, dequantize, then ``F.linear``), the oracle every kernel is
        tested against."""
        w = self.dequantized_weight(x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.quantize_input(self.transform_input(x)), w, b)

    def layer_config(self) -> dict:
        """JSON-able constructor arguments (besides spec/act), used by save/load."""
        return {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None,
                "input_scale": self.input_scale is not None, "input_rotation": self.input_rotation}

    def extra_repr(self) -> str:
        rot = "" if self.input_rotation is None else f", input_rotation={self.input_rotation}"
        return f"in_features={self.in_features}, out_features={self.out_features}, " \
               f"bias={self.bias is not None}{rot}, {self._describe()}"

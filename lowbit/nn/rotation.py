"""Online input rotations: a linear layer that rotates its input by a normalized Hadamard before its weight.

QuaRot (Ashkboos et al. 2024, section 4) keeps some rotations *online*: where no earlier layer can absorb a
rotation (the input of an MLP's down projection follows an elementwise product), the layer applies
``x -> x H_b / sqrt(b)`` itself, on each block of ``b`` consecutive features (``b`` = the whole width, or a
head's width), by the fast transform in ``lowbit.hadamard`` (O(n log n), no dense matrix), and its weight
holds ``W H_b / sqrt(b)`` per block so that the product is unchanged. The rotated input has no outlier
channels left, which is what low-bit activations (and, through the GPTQ Hessian, low-bit weights) need.

:class:`RotatedLinear` is the float form (an ``nn.Linear`` whose forward applies the rotation; the weight
``lowbit.transforms`` wrote is already rotated); ``lowbit.nn.QuantLinear(input_rotation=b)`` the quantized
one. :func:`module_input` is what the weight of any module multiplies: calibration observes that, not the
raw input a forward hook receives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InputError
from lowbit.hadamard import hadamard_order_split, hadamard_transform, is_hadamard_width


def check_rotation(size: int, in_features: int, where: str) -> None:
    """InputError unless blocks of ``size`` tile ``in_features`` and ``size`` is a Hadamard order lowbit builds."""
    if isinstance(size, bool) or not isinstance(size, int) or size < 1 or in_features % size:
        raise InputError(f"{where}: an input rotation of {size!r} features does not tile its {in_features} inputs")
    if not is_hadamard_width(size):
        try:
            hadamard_order_split(size)
        except InputError as e:
            raise InputError(f"{where}: cannot rotate blocks of {size} features online: {e}") from None


def rotate_input(x: torch.Tensor, size: int, inverse: bool = False) -> torch.Tensor:
    """``x`` ``(..., n)`` with each block of ``size`` features multiplied by ``H_size / sqrt(size)`` (the
    inverse: by its transpose); same shape and dtype."""
    n = x.shape[-1]
    if size == n:
        return hadamard_transform(x, transpose=inverse)
    return hadamard_transform(x.reshape(*x.shape[:-1], n // size, size), transpose=inverse).reshape(x.shape)


def rotate_weight_columns(w: torch.Tensor, size: int) -> torch.Tensor:
    """The weight ``(out, in)`` a layer with an input rotation of ``size`` holds so that
    ``rotate_input(x) @ result.T == x @ w.T``: each row rotated the same way as the input (``H`` orthogonal)."""
    return rotate_input(w, size)


class RotatedLinear(nn.Linear):
    """``y = rotate_input(x, input_rotation) @ W.T + b``: an ``nn.Linear`` with an online Hadamard on its input.

    Shapes as ``nn.Linear``; ``input_rotation`` (an int) divides ``in_features``. Built by
    ``lowbit.transforms`` from a plain linear whose weight it rotated (:meth:`from_linear`).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_rotation: int | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        size = in_features if input_rotation is None else input_rotation
        check_rotation(size, in_features, type(self).__name__)
        self.input_rotation = size

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None, size: int) -> "RotatedLinear":
        """A RotatedLinear holding ``weight`` ``(out, in)`` (already rotated) and ``bias`` ``(out,)`` (copies)."""
        out_features, in_features = weight.shape
        with torch.device("meta"):
            m = cls(in_features, out_features, bias is not None, size)
        m.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
        m.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        return m

    @classmethod
    def like(cls, lin: nn.Module, size: int) -> "RotatedLinear":
        """An uninitialized RotatedLinear of the shape, dtype and device of linear ``lin`` (an ``nn.Linear``
        or transformers' ``Conv1D``), for a model whose weights are loaded afterwards."""
        w = lin.weight
        transposed = not isinstance(lin, nn.Linear)  # Conv1D stores (in, out)
        out_features, in_features = (w.shape[1], w.shape[0]) if transposed else tuple(w.shape)
        with torch.device(w.device):
            m = cls(int(in_features), int(out_features), lin.bias is not None, size, dtype=w.dtype)
        return m.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(rotate_input(x, self.input_rotation), self.weight, self.bias)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", input_rotation={self.input_rotation}"


def input_rotation(m: nn.Module) -> int | None:
    """The block size of ``m``'s online input rotation, or None."""
    size = getattr(m, "input_rotation", None)
    return size if isinstance(size, int) and not isinstance(size, bool) else None


def module_input(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """What the weight of float module ``m`` multiplies when ``m`` is called on ``x`` (its rotated input)."""
    size = input_rotation(m) if isinstance(m, RotatedLinear) else None
    return x if size is None else rotate_input(x, size)


__all__ = ["RotatedLinear", "check_rotation", "input_rotation", "module_input", "rotate_input",
           "rotate_weight_columns"]

"""What every linear kernel checks first: a QuantLinear with integer weights of one width and granularity."""

from __future__ import annotations

import torch

from lowbit.errors import InputError
from lowbit.nn.base import QuantModule
from lowbit.nn.linear import QuantLinear


def int_linear_why_not(m: QuantModule, bits: int, granularities: tuple[str, ...]) -> str | None:
    """None if ``m`` is a QuantLinear with ``bits``-bit integer weights of one of ``granularities``, else why not."""
    if not isinstance(m, QuantLinear):
        return f"a {type(m).__name__}, not a linear layer"
    spec = m.spec
    if spec.format != "int" or spec.bits != bits:
        return f"weight format {spec.name} is not a {bits}-bit integer"
    if spec.granularity not in granularities:
        wanted = " or ".join("groups" if g == "group" else "per channel" for g in granularities)
        return f"weight granularity {spec.granularity} (needs {wanted})"
    return None


def check_width(x: torch.Tensor, in_features: int) -> None:
    """Raise InputError unless ``x``'s last dimension is ``in_features`` (a C kernel would read past it)."""
    if x.dim() == 0 or x.shape[-1] != in_features:
        raise InputError(f"input of shape {tuple(x.shape)} does not end in the layer's {in_features} inputs")

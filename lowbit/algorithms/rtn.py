"""Round-to-nearest (RTN): every weight to the nearest level of its tile's range.

The baseline every other method is measured against. The range is the tile's min/max (``quantize``'s
default) or, with ``clip_search``, the per-tile shrunken range of :func:`mse_clip_search`, optionally
weighted by activation statistics (``weighted``): by the layer's input Hessian ``H = X^T X / n`` (the
output error, AWQ's clipping objective) or by its diagonal ``importance = mean(x**2)`` per input column.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from lowbit.algorithms.config import AlgorithmConfig, WeightResult, stat
from lowbit.errors import InputError
from lowbit.formats import QuantizedTensor, quantize
from lowbit.observers.clip_search import mse_clip_search
from lowbit.spec import QuantSpec


@dataclass(frozen=True)
class RTN(AlgorithmConfig):
    """Round-to-nearest, optionally with a per-tile MSE clipping search.

    Attributes:
        clip_search: search each tile's range instead of using its min/max.
        grid: ratios tried by the search (``1 - k * max_shrink / grid``, ``k = 0 .. grid - 1``).
        max_shrink: how far the search may shrink a range, in ``[0, 1)``.
        weighted: measure the search's error on the layer's output, with the input Hessian
            ``H = X^T X / n`` (or, given only that, its diagonal ``importance = mean(x**2)``) computed from
            calibration data (then ``needs_data`` is True). Needs ``clip_search``.
    """

    clip_search: bool = False
    grid: int = 20
    max_shrink: float = 0.5
    weighted: bool = False

    name: ClassVar[str] = "rtn"

    def __post_init__(self) -> None:
        for f in ("clip_search", "weighted"):
            if not isinstance(getattr(self, f), bool):
                raise InputError(f"rtn: {f} must be true or false, got {getattr(self, f)!r}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise InputError(f"rtn: grid must be a positive integer, got {self.grid!r}")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) \
                or not 0.0 <= self.max_shrink < 1.0:
            raise InputError(f"rtn: max_shrink must be a number in [0, 1), got {self.max_shrink!r}")
        object.__setattr__(self, "max_shrink", float(self.max_shrink))
        if self.weighted and not self.clip_search:
            raise InputError("rtn: weighted: true only changes the clipping search; set clip_search: true too")

    @property
    def stats_needed(self) -> tuple[str, ...]:
        """The Hessian of the layer's inputs when the clipping search is weighted by the output error."""
        return ("hessian",) if self.weighted else ()

    def run(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor], spec: QuantSpec,
            ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> WeightResult:
        """:func:`rtn` on ``W``; with ``ranges`` (a preceding algorithm's clipped ranges) round within them."""
        if ranges is not None:
            return WeightResult(quantize(W, spec, *ranges))
        return WeightResult(rtn(W, spec, self, hessian=stat(stats, "hessian", "rtn (weighted)") if self.weighted
                                else None))


def rtn(
    weight: torch.Tensor,
    spec: QuantSpec,
    config: RTN = RTN(),
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
) -> QuantizedTensor:
    """Quantize ``weight`` (float, any shape, seen as ``(rows, cols)``) by rounding to nearest.

    Args:
        importance: ``(cols,)`` non-negative error weight per input column, e.g. ``mean(x**2)`` of the
            layer's inputs.
        hessian: ``(cols, cols)`` input second moment ``X^T X / n``; the search then minimises each tile's
            output error (see :func:`mse_clip_search`). Used instead of ``importance`` when both are given.
            One of the two is required when ``config.weighted``; both only matter with ``clip_search``.
    Returns:
        the :class:`QuantizedTensor`; equal to ``quantize(weight, spec)`` when ``clip_search`` is off.
    Raises:
        InputError: importance/hessian missing (weighted) or given without clip search, bad weight or shapes.
    """
    if config.weighted and importance is None and hessian is None:
        raise InputError("rtn(weighted=True) needs importance = mean(x**2) per input feature or the Hessian "
                         "X^T X / n from calibration data; pass data to quantize() or set weighted: false")
    if (importance is not None or hessian is not None) and not config.clip_search:
        raise InputError("rtn: importance/hessian only change the clipping search; set clip_search=True or drop it")
    if not config.clip_search:
        return quantize(weight, spec)
    if hessian is not None:
        importance = None
    lo, hi = mse_clip_search(weight, spec, importance=importance, hessian=hessian, grid=config.grid,
                             max_shrink=config.max_shrink)
    return quantize(weight, spec, lo, hi)

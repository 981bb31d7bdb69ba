"""Percentile observer: clip each tile at a quantile of the values seen, so rare outliers do not set the range.

Streaming without a sample: the observer keeps exact counts of every value rounded to bfloat16
(:class:`~lowbit.observers.base.ValueCounts`, at most 65536 counts per tile), so the result does not depend
on how the data was split into updates and involves no randomness. Rounding is monotone, so the quantile
is the exact nearest-rank quantile of the rounded data: within a relative ``2**-8`` (0.4 %) of the data's
own, about half a step of an int8 grid at the end of the range. (A reservoir of ``k`` values would instead
miss the ``p``-quantile's rank by about ``sqrt(p (1 - p) / k)``: 10 % of the tail mass at p = 99.99 % and
k = 10**6.)
"""

from __future__ import annotations

import torch

from lowbit.errors import InputError
from lowbit.observers.base import Observer, ValueCounts
from lowbit.spec import QuantSpec


class PercentileObserver(Observer):
    """Per-tile range at the ``percentile``-th percentile of the values seen.

    Symmetric specs take the percentile of ``|x|`` (``lo = -hi``); asymmetric ones clip both tails, at the
    ``100 - percentile`` and ``percentile`` percentiles of ``x``. ``percentile = 100`` is the min/max (of the
    values rounded to bfloat16). Works at every granularity (per tile for weights, see ``base``).
    """

    name = "percentile"

    def __init__(self, spec: QuantSpec, percentile: float = 99.99) -> None:
        super().__init__(spec)
        p = percentile
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 50.0 < p <= 100.0:
            raise InputError(f"PercentileObserver: percentile must be in (50, 100], got {p!r} (e.g. 99.99)")
        self.percentile = float(p)
        self._counts: ValueCounts | None = None

    def __repr__(self) -> str:
        return f"PercentileObserver({self.spec.name}, percentile={self.percentile})"

    @property
    def _symmetric(self) -> bool:
        return not self.spec.has_zero_point

    def _accumulate(self, x: torch.Tensor) -> None:  # x: (rows, cols)
        if self._counts is None:
            self._counts = ValueCounts(self.spec, self.scale_grid)
        self._counts.add(x.abs() if self._symmetric else x)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.percentile / 100.0
        counts = self._counts
        assert counts is not None  # set by the first update
        hi = counts.quantile(q)  # (n_tiles,)
        if self._symmetric:
            return -hi, hi
        return counts.quantile(1.0 - q), hi

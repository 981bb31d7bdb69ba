"""Min/max observer: the running minimum and maximum of each tile, or their moving average."""

from __future__ import annotations

import torch

from lowbit.errors import InputError
from lowbit.formats import block_minmax
from lowbit.observers.base import Observer
from lowbit.spec import QuantSpec


class MinMaxObserver(Observer):
    """Per-tile running min/max: the range that clips nothing seen.

    With ``averaging_constant = c`` the range is instead an exponential moving average of each update's
    min/max, ``lo <- lo + c * (lo_batch - lo)`` (started at the first batch), as in PyTorch's
    ``MovingAverageMinMaxObserver``: one outlier batch then moves the range by only ``c`` of its excess.

    Without averaging, the result is exactly the min/max of all data seen, however it was split into
    updates. Padded cells of edge tiles count as zeros, as in ``default_range``.
    """

    name = "minmax"

    def __init__(self, spec: QuantSpec, averaging_constant: float | None = None) -> None:
        super().__init__(spec)
        c = averaging_constant
        if c is not None and (isinstance(c, bool) or not isinstance(c, (int, float)) or not 0.0 < c <= 1.0):
            raise InputError(f"MinMaxObserver: averaging_constant must be in (0, 1] or None, got {c!r}")
        self.averaging_constant = None if c is None else float(c)
        self._lo: torch.Tensor | None = None  # (gr, gc)
        self._hi: torch.Tensor | None = None

    def __repr__(self) -> str:
        extra = "" if self.averaging_constant is None else f", averaging_constant={self.averaging_constant}"
        return f"MinMaxObserver({self.spec.name}{extra})"

    def _accumulate(self, x: torch.Tensor) -> None:  # x: (rows, cols)
        lo, hi = block_minmax(x, self.spec)  # (gr, gc) each
        if self._lo is None or self._hi is None:
            self._lo, self._hi = lo, hi
        elif self.averaging_constant is None:
            self._lo, self._hi = torch.minimum(self._lo, lo), torch.maximum(self._hi, hi)
        else:
            c = self.averaging_constant
            self._lo, self._hi = self._lo + c * (lo - self._lo), self._hi + c * (hi - self._hi)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self._lo, self._hi  # type: ignore[return-value]

"""MSE observer: the per-tile range whose quantization error over all data seen is smallest.

It keeps the exact min/max of each tile and exact counts of its values rounded to bfloat16
(:class:`~lowbit.observers.base.ValueCounts`: bounded memory, independent of how data was split into
updates). ``compute()`` runs :func:`~lowbit.observers.clip_search.mse_clip_search` on the distinct values,
each weighted by how often it occurred, which is the squared error summed over every value seen (up to the
bfloat16 rounding of the values, at most a relative ``2**-8``). The candidates shrink the exact min/max, so the
first one is exactly the :class:`~lowbit.observers.minmax.MinMaxObserver` range.
"""

from __future__ import annotations

import torch

from lowbit.observers.clip_search import mse_clip_search
from lowbit.errors import InputError
from lowbit.formats import block_minmax
from lowbit.observers.base import Observer, ValueCounts
from lowbit.spec import QuantSpec


class MSEObserver(Observer):
    """Per-tile range minimizing the squared quantization error of the data seen under ``spec``.

    Tries ``(lo * r, hi * r)`` for ``r = 1 - k * max_shrink / grid``, ``k = 0 .. grid - 1``, around the
    tile's min/max (see :func:`~lowbit.observers.clip_search.mse_clip_search`). Works at every granularity.
    """

    name = "mse"

    def __init__(self, spec: QuantSpec, grid: int = 100, max_shrink: float = 0.8) -> None:
        super().__init__(spec)
        if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
            raise InputError(f"MSEObserver: grid must be a positive integer, got {grid!r}")
        if isinstance(max_shrink, bool) or not isinstance(max_shrink, (int, float)) or not 0 <= max_shrink < 1:
            raise InputError(f"MSEObserver: max_shrink must be in [0, 1), got {max_shrink!r}")
        self.grid = grid
        self.max_shrink = float(max_shrink)
        self._counts: ValueCounts | None = None
        self._lo: torch.Tensor | None = None  # (gr, gc) exact running min
        self._hi: torch.Tensor | None = None

    def __repr__(self) -> str:
        return f"MSEObserver({self.spec.name}, grid={self.grid}, max_shrink={self.max_shrink})"

    def _accumulate(self, x: torch.Tensor) -> None:  # x: (rows, cols)
        lo, hi = block_minmax(x, self.spec)
        if self._counts is None or self._lo is None or self._hi is None:
            self._counts = ValueCounts(self.spec, self.scale_grid)
            self._lo, self._hi = lo, hi
        else:
            self._lo, self._hi = torch.minimum(self._lo, lo), torch.maximum(self._hi, hi)
        self._counts.add(x)

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts, lo, hi = self._counts, self._lo, self._hi
        assert counts is not None and lo is not None and hi is not None  # set by the first update
        values, weights = _per_tile_matrix(counts)  # (n_tiles, L) each
        # one row per tile: the same format and scale storage, so each row gets the tile's own range
        row_spec = self.spec.with_(granularity="channel", group_size=None, block_shape=None)
        return mse_clip_search(values, row_spec, importance=weights, grid=self.grid, max_shrink=self.max_shrink,
                               lo=lo.reshape(-1, 1), hi=hi.reshape(-1, 1))


def _per_tile_matrix(counts: ValueCounts) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values of each tile in a row, zero-padded, and their counts (0 for padding): ``(n_tiles, L)``."""
    tile, value, count = counts.entries()  # (m,) each, sorted by tile
    per_tile = torch.zeros(counts.n_tiles, dtype=torch.int64).index_add_(0, tile, torch.ones_like(tile))
    start = torch.cumsum(per_tile, 0) - per_tile  # (n_tiles,)
    pos = torch.arange(tile.numel()) - start[tile]  # (m,) column of each entry in its row
    width = int(per_tile.max())
    values = torch.zeros(counts.n_tiles, width)
    weights = torch.zeros(counts.n_tiles, width)
    values[tile, pos] = value
    weights[tile, pos] = count.float()
    return values, weights

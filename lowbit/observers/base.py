"""What every observer shares: the immutable :class:`Range` it computes, input checks, and exact value counts.

Observers follow the estimator contract (DESIGN.md, principle 5): the constructor stores settings,
``update(x)`` accumulates and may be called any number of times, ``compute()`` returns a new immutable
:class:`Range` and changes nothing, so updates may continue after it.

Which 2-D view an observer sees:

* ``granularity="tensor"``: any shapes, mixed freely across updates (activations ``(..., features)``);
  the range is one ``(1, 1)`` tile.
* any other granularity: the spec's own view of the tensor, ``(shape[0], prod(shape[1:]))`` (the view
  ``quantize`` uses, so the range fits it), and every update must have that same 2-D shape. This is for
  weights; a static per-token range of activations does not exist (their row count changes per batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import ClassVar

import torch

from lowbit.errors import InputError
from lowbit.formats.blocks import as_matrix_shape, grid_shape
from lowbit.formats.qtensor import all_finite
from lowbit.spec import QuantSpec


@dataclass(frozen=True, eq=False)
class Range:
    """Per-tile clipping range: ``lo``, ``hi`` float32 ``(gr, gc)``, the spec's scale grid.

    Pass it on as ``quantize(x, spec, r.lo, r.hi)``; ``lo, hi = r`` also works.
    """

    lo: torch.Tensor
    hi: torch.Tensor

    def __post_init__(self) -> None:
        if self.lo.shape != self.hi.shape or self.lo.dim() != 2:
            raise InputError(f"Range needs lo and hi of one 2-D shape, got {tuple(self.lo.shape)} "
                             f"and {tuple(self.hi.shape)}")

    def __iter__(self):
        return iter((self.lo, self.hi))


class Observer:
    """Base class: input checks and shape bookkeeping. Subclasses define ``_accumulate`` and ``_range``."""

    name: ClassVar[str] = "observer"

    def __init__(self, spec: QuantSpec) -> None:
        if not isinstance(spec, QuantSpec):
            raise InputError(f"{type(self).__name__} needs a QuantSpec, got {type(spec).__name__}; "
                             f"use QuantSpec.parse('int8-tensor') or similar")
        self.spec = spec
        self._shape: tuple[int, int] | None = None  # 2-D view, fixed by the first update
        self._updates = 0

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec.name})"

    @property
    def per_tensor(self) -> bool:
        return self.spec.granularity == "tensor"

    @property
    def scale_grid(self) -> tuple[int, int]:
        """Shape ``(gr, gc)`` of the range; known after the first update."""
        if self.per_tensor:
            return (1, 1)
        if self._shape is None:
            raise InputError(f"{self!r}: the scale grid is unknown before the first update()")
        return grid_shape(self.spec, self._shape)

    def update(self, x: torch.Tensor) -> None:
        """Accumulate statistics of ``x`` (float, any shape; see the module docstring for the view).

        Raises:
            InputError: ``x`` is not a tensor, is empty, holds NaN/Inf, or (per tile) changes shape.
        """
        self._accumulate(self._matrix(x))
        self._updates += 1

    def compute(self) -> Range:
        """The range from everything seen so far; no side effects.

        Raises:
            InputError: no update() happened yet.
        """
        if self._updates == 0:
            raise InputError(f"observer {self!r} saw no data; the calibration set is empty?")
        lo, hi = self._range()
        g = self.scale_grid
        return Range(lo.detach().float().reshape(g).clone(), hi.detach().float().reshape(g).clone())

    # ---- for subclasses -----------------------------------------------------------------------------

    def _accumulate(self, x: torch.Tensor) -> None:  # x: float32 (rows, cols)
        raise NotImplementedError

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:  # each (gr, gc)
        raise NotImplementedError

    def _matrix(self, x: torch.Tensor) -> torch.Tensor:
        """Checked float32 2-D view: ``(1, numel)`` per tensor, the spec's ``(rows, cols)`` otherwise."""
        if not isinstance(x, torch.Tensor):
            raise InputError(f"{self!r}.update() needs a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise InputError(f"{self!r}.update() got an empty tensor of shape {tuple(x.shape)}")
        if x.is_complex():
            raise InputError(f"{self!r}.update() got a complex tensor ({x.dtype}); observers need real values")
        xf = x.detach().float()
        if not all_finite(xf):
            bad = int((~torch.isfinite(xf)).sum())
            raise InputError(f"{self!r}.update() got a tensor of shape {tuple(x.shape)} holding {bad} NaN/Inf "
                             f"value(s); check the model's inputs and the layer feeding this one")
        if self.per_tensor:
            return xf.reshape(1, -1)
        shape = as_matrix_shape(x.shape)
        if self._shape is None:
            self._shape = shape
        elif shape != self._shape:
            raise InputError(f"{self!r} first saw a {self._shape} matrix and now a {shape} one (tensor shape "
                             f"{tuple(x.shape)}); a {self.spec.granularity} range needs one fixed shape. "
                             f"For activations use a per-tensor spec such as 'int8-tensor'")
        return xf.reshape(shape)


# ---- exact counts of values rounded to bfloat16 -----------------------------------------------------------

_N_CODES = 65536  # bfloat16 bit patterns
_DENSE_LIMIT = 16  # tiles up to which counts are one dense vector per tile (512 KiB each)
_CHUNK = 1 << 22  # elements hashed at a time, to bound temporary memory


@lru_cache(maxsize=None)
def _bf16_tables() -> tuple[torch.Tensor, torch.Tensor]:
    """``rank[code]``: position of each bfloat16 code in ascending value order; ``value[rank]``: its value."""
    signed = torch.arange(_N_CODES, dtype=torch.int32)
    signed = torch.where(signed >= 32768, signed - _N_CODES, signed)  # the same bits as int16
    vals = signed.to(torch.int16).view(torch.bfloat16).float()
    vals = torch.where(torch.isnan(vals), torch.full_like(vals, math.inf), vals)  # never produced; sort last
    order = torch.sort(vals, stable=True).indices
    rank = torch.empty(_N_CODES, dtype=torch.int64)
    rank[order] = torch.arange(_N_CODES)
    return rank, vals[order]


def _bf16_rank(x: torch.Tensor) -> torch.Tensor:
    """Rank (in value order) of each value of ``x`` rounded to bfloat16: int64, the shape of ``x``."""
    big = float(torch.finfo(torch.bfloat16).max)  # fp32 values beyond it would round to inf
    codes = x.clamp(-big, big).to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF
    return _bf16_tables()[0][codes]


class ValueCounts:
    """How often each value, rounded to bfloat16, occurred in each tile: exact, order-independent counts.

    Rounding is monotone, so order statistics of the counted values are those of the data rounded to
    bfloat16: within a relative ``2**-8`` of the exact ones. Memory is at most 65536 counts per tile
    (dense up to 16 tiles, otherwise one sparse entry per distinct value and tile).
    """

    def __init__(self, spec: QuantSpec, grid: tuple[int, int]) -> None:
        self.spec = spec
        self.n_tiles = grid[0] * grid[1]  # tiles of every matrix added, numbered row-major over (gr, gc)
        self._dense: torch.Tensor | None = None  # (n_tiles * 65536,) int64
        self._keys = torch.empty(0, dtype=torch.int64)  # sorted tile * 65536 + rank
        self._counts = torch.empty(0, dtype=torch.int64)

    def add(self, x: torch.Tensor) -> None:
        """Count the values of ``x``: float32 ``(rows, cols)`` whose scale grid is the one given at construction."""
        if self.n_tiles == 1:  # per tensor: any shape, no tile index
            for part in x.reshape(-1).split(_CHUNK):
                self._add_keys(_bf16_rank(part))
            return
        rows, cols = x.shape
        br, bc = self.spec.block(rows, cols)
        gc = math.ceil(cols / bc)
        tc = torch.arange(cols) // bc  # (cols,) tile column of each column
        step = max(1, _CHUNK // cols)
        for r0 in range(0, rows, step):
            part = x[r0 : r0 + step]  # (r, cols)
            tr = torch.arange(r0, r0 + part.shape[0]) // br  # (r,) tile row of each row
            keys = _bf16_rank(part) + (tr[:, None] * gc + tc[None, :]) * _N_CODES  # (r, cols)
            self._add_keys(keys.reshape(-1))

    def _add_keys(self, keys: torch.Tensor) -> None:
        if self.n_tiles <= _DENSE_LIMIT:
            c = torch.bincount(keys, minlength=self.n_tiles * _N_CODES)
            self._dense = c if self._dense is None else self._dense + c
            return
        k, c = torch.unique(keys, return_counts=True)
        k, inv = torch.unique(torch.cat([self._keys, k]), return_inverse=True)
        self._counts = torch.zeros(k.numel(), dtype=torch.int64).index_add_(0, inv, torch.cat([self._counts, c]))
        self._keys = k

    def entries(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(tile, value, count)``, each ``(m,)``, sorted by tile then value; every tile has an entry."""
        if self._dense is not None:
            keys = torch.nonzero(self._dense).reshape(-1)
            counts = self._dense[keys]
        else:
            keys, counts = self._keys, self._counts
        _, value = _bf16_tables()
        return keys // _N_CODES, value[keys % _N_CODES], counts

    def quantile(self, q: float) -> torch.Tensor:
        """Nearest-rank ``q``-quantile (``0 <= q <= 1``) of each tile: float32 ``(n_tiles,)``.

        The value of rank ``max(1, ceil(q * n))`` in ascending order, ``n`` the tile's count.
        """
        tile, value, counts = self.entries()
        cum = torch.cumsum(counts, 0)  # (m,) strictly increasing
        n = torch.zeros(self.n_tiles, dtype=torch.int64).index_add_(0, tile, counts)
        base = torch.cumsum(n, 0) - n  # (n_tiles,) count before each tile
        qn = q * n.double()
        target = torch.ceil(qn - 1e-9 * qn).long().clamp(1)  # (n_tiles,); the slack absorbs q's binary error
        target = torch.minimum(target, n)
        idx = torch.searchsorted(cum, base + target)
        return value[idx]

"""Clipping-range search: per tile, the shrunken range whose quantization error is smallest.

Clipping trades a larger error on the few values beyond the range for a finer grid on all the others;
on heavy-tailed weights at 2-4 bits that trade pays. This is the grid search over ``max_val * ratio``
of AWQ's ``auto_clip`` (Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and
Acceleration", MLSys 2024, Sec. 3.3 and its released code), which measures the error on the layer's output;
with ``hessian = X^T X / n`` of the layer's inputs the error of a tile is exactly that output error (of the
tile's own columns, computed from ``H`` instead of stored samples); ``importance = mean(x**2)`` per input
column is its diagonal approximation. Without either it is the standard MSE calibration of a quantizer
(e.g. the "mse" range setting of Nagel et al., "A White Paper on Neural Network Quantization", 2021,
Sec. 3.4.1).
"""

from __future__ import annotations

import math

import torch

from lowbit.errors import InputError
from lowbit.formats import all_finite, as_matrix_shape, default_range, fake_quantize, grid_shape
from lowbit.formats.blocks import block_sum
from lowbit.spec import QuantSpec


def mse_clip_search(
    x: torch.Tensor,
    spec: QuantSpec,
    *,
    importance: torch.Tensor | None = None,
    hessian: torch.Tensor | None = None,
    grid: int = 20,
    max_shrink: float = 0.5,
    lo: torch.Tensor | None = None,
    hi: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-tile range minimizing the (weighted) squared error of fake quantization under ``spec``.

    Every tile tries the ranges ``(lo * r, hi * r)`` for ``r = 1 - k * max_shrink / grid``,
    ``k = 0 .. grid - 1``, and keeps its own best; ties keep the larger range. ``k = 0`` is the unclipped
    range, so the error never exceeds that of ``quantize(x, spec, lo, hi)``. Vectorised over tiles, one
    fake quantization of ``x`` per ratio. (For two-level scales, ``scale_format="fp8_e4m3"`` as in NVFP4,
    the per-tensor scale follows the largest chosen range, so the per-tile guarantee is approximate there.)

    Args:
        x: float tensor, any shape; tiles are on its 2-D view ``(rows, cols)`` as in ``quantize``.
        spec: the format and granularity.
        importance: optional non-negative weights of the squared error: ``(cols,)`` per input column
            (e.g. ``mean(x**2)`` of the layer's input features, for an activation-aware error) or
            ``(rows, cols)`` per element (e.g. how often each value occurred).
        hessian: optional ``(cols, cols)`` symmetric PSD input second moment ``H = X^T X / n`` of the layer
            (exclusive with ``importance``). The error of tile ``t`` is then its output error
            ``sum_r e_r^T H_tt e_r`` over the tile's rows ``r``, with ``e_r = x_r - fq(x_r)`` restricted to the
            tile's columns and ``H_tt`` the diagonal block of ``H`` for those columns (AWQ's ``auto_clip``
            objective). Exact at every granularity: ``channel``/``token`` (all columns), ``group`` (a shorter
            last group gets its own smaller block), ``block`` (column blocks of ``block_shape[1]``, summed over
            the tile's rows) and ``tensor`` (``trace(E H E^T)``). The layer's whole output error
            ``trace(E H E^T)`` also holds cross terms ``e_g^T H_gh e_h`` between the column tiles of a row,
            which no per-tile choice sees; so where tiles are narrower than a row, a row of tiles whose
            whole error ``sum_r e_r^T H e_r`` came out above the unclipped one's is reset to the unclipped
            ranges. Hence both each tile's error and ``trace(E H E^T)`` never exceed the unclipped ones'.
        grid: number of ratios tried (>= 1).
        max_shrink: in ``[0, 1)``; the smallest ratio tried is ``1 - max_shrink * (grid - 1) / grid``.
        lo, hi: float ``(gr, gc)`` range to shrink; default ``default_range(x, spec)`` (min/max per tile).
    Returns:
        ``(lo, hi)``: float32 ``(gr, gc)`` each, ready for ``quantize(x, spec, lo, hi)``.
    Raises:
        InputError: bad settings, ``x`` empty or not finite, importance/hessian or range of the wrong shape,
            both importance and hessian given.
    """
    if not isinstance(grid, int) or grid < 1:
        raise InputError(f"clip search needs grid >= 1 ratios, got grid={grid!r}")
    if not 0.0 <= float(max_shrink) < 1.0:
        raise InputError(f"clip search needs 0 <= max_shrink < 1, got max_shrink={max_shrink!r}")
    if x.numel() == 0:
        raise InputError("clip search got an empty tensor")
    rows, cols = as_matrix_shape(x.shape)
    xm = x.detach().float().reshape(rows, cols)  # (rows, cols)
    if not all_finite(xm):
        raise InputError(f"clip search got a tensor of shape {tuple(x.shape)} holding NaN/Inf")
    if importance is not None and hessian is not None:
        raise InputError("clip search takes importance (diagonal weights) or hessian (full X^T X), not both")
    w = _error_weights(importance, rows, cols)  # None, (1, cols) or (rows, cols)
    tile_error = _HessianError(hessian, spec, rows, cols) if hessian is not None else None
    lo, hi = _base_range(xm, spec, lo, hi)  # (gr, gc) each

    best_err = torch.full(lo.shape, torch.inf, dtype=torch.float64, device=lo.device)  # (gr, gc)
    best_lo, best_hi = lo.clone(), hi.clone()
    for k in range(grid):
        ratio = 1.0 - k * float(max_shrink) / grid
        c_lo, c_hi = lo * ratio, hi * ratio
        diff = fake_quantize(xm, spec, c_lo, c_hi) - xm  # (rows, cols)
        if tile_error is not None:
            e = tile_error(diff)  # (gr, gc), fp64
        else:
            err = diff.square_()
            if w is not None:
                err.mul_(w)
            e = block_sum(err.double(), spec)  # (gr, gc); fp64 so near-ties compare reliably
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_lo = torch.where(better, c_lo, best_lo)
        best_hi = torch.where(better, c_hi, best_hi)
    if tile_error is not None and best_lo.shape[1] > 1:  # tiles narrower than a row: mind the cross terms
        worse = tile_error.row_error(fake_quantize(xm, spec, best_lo, best_hi) - xm) \
            > tile_error.row_error(fake_quantize(xm, spec, lo, hi) - xm)  # (gr, 1)
        best_lo, best_hi = torch.where(worse, lo, best_lo), torch.where(worse, hi, best_hi)
    return best_lo, best_hi


def _error_weights(importance: torch.Tensor | None, rows: int, cols: int) -> torch.Tensor | None:
    """Importance as a float32 tensor broadcasting against ``(rows, cols)``, checked."""
    if importance is None:
        return None
    if not isinstance(importance, torch.Tensor):
        raise InputError(f"importance must be a tensor of shape ({cols},) or ({rows}, {cols}), "
                         f"got {type(importance).__name__}")
    imp = importance.detach().float()
    if tuple(imp.shape) == (cols,):
        imp = imp.reshape(1, cols)
    elif tuple(imp.shape) != (rows, cols):
        raise InputError(f"importance has shape {tuple(importance.shape)}; expected ({cols},) per input column "
                         f"or ({rows}, {cols}) per element of the weight's 2-D view")
    if not torch.isfinite(imp).all() or bool((imp < 0).any()):
        raise InputError("importance must be finite and non-negative (e.g. mean(x**2) of the input features)")
    return imp


class _HessianError:
    """Per-tile output error ``sum_r e_r^T H_tt e_r`` of an error matrix ``E`` ``(rows, cols)``.

    Products in float32 (the cost: one pass per candidate range), sums over rows in float64.

    The columns are cut into ``ng`` full groups of ``G = bc`` (the tile width) plus a shorter last group of
    ``p`` columns; the diagonal blocks of ``H`` are extracted once: ``(ng, G, G)`` and ``(p, p)``.
    """

    def __init__(self, hessian: torch.Tensor, spec: QuantSpec, rows: int, cols: int) -> None:
        if not isinstance(hessian, torch.Tensor) or tuple(hessian.shape) != (cols, cols):
            got = tuple(hessian.shape) if isinstance(hessian, torch.Tensor) else type(hessian).__name__
            raise InputError(f"hessian has shape {got}; expected ({cols}, {cols}) = X^T X / n of the layer's "
                             f"{cols} input features")
        H = hessian.detach().float()
        if not all_finite(H):
            raise InputError(f"hessian ({cols}, {cols}) holds NaN/Inf; check the calibration data")
        self.rows, self.cols = rows, cols
        self.br, self.G = spec.block(rows, cols)
        self.ng, self.p = divmod(cols, self.G)
        n = self.ng * self.G
        idx = torch.arange(self.ng, device=H.device)
        self.Hb = H[:n, :n].reshape(self.ng, self.G, self.ng, self.G)[idx, :, idx, :]  # (ng, G, G)
        self.Hp = H[n:, n:]  # (p, p)
        self.H = H  # (cols, cols)
        self.gr = math.ceil(rows / self.br)

    def row_error(self, E: torch.Tensor) -> torch.Tensor:
        """Whole output error ``sum_r e_r^T H e_r`` of each row of tiles (cross terms included): ``(gr, 1)``."""
        E = E.float()
        return self._sum_rows(((E @ self.H) * E).sum(-1, keepdim=True).double())

    def __call__(self, E: torch.Tensor) -> torch.Tensor:
        E = E.float()
        n = self.ng * self.G
        parts = []
        if self.ng:
            Eg = E[:, :n].reshape(self.rows, self.ng, self.G).transpose(0, 1)  # (ng, rows, G)
            parts.append((torch.bmm(Eg, self.Hb) * Eg).sum(-1).t().double())  # (rows, ng)
        if self.p:
            Ep = E[:, n:]  # (rows, p)
            parts.append(((Ep @ self.Hp) * Ep).sum(-1, keepdim=True).double())  # (rows, 1)
        return self._sum_rows(torch.cat(parts, dim=1))  # (rows, gc): per row and column group -> (gr, gc)

    def _sum_rows(self, err: torch.Tensor) -> torch.Tensor:
        """``(rows, k)`` -> ``(gr, k)``: sums over the rows of each row of tiles."""
        pad = self.gr * self.br - self.rows
        if pad:
            err = torch.nn.functional.pad(err, (0, 0, 0, pad))
        return err.reshape(self.gr, self.br, -1).sum(1)


def _base_range(
    xm: torch.Tensor, spec: QuantSpec, lo: torch.Tensor | None, hi: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    if (lo is None) != (hi is None):
        raise InputError("clip search: give both lo and hi, or neither")
    if lo is None:
        return default_range(xm, spec)
    g = grid_shape(spec, xm.shape)
    if tuple(lo.shape) != g or tuple(hi.shape) != g:
        raise InputError(f"clip search: range of shape {tuple(lo.shape)}/{tuple(hi.shape)} does not match the "
                         f"scale grid {g} of {spec.name} on a {tuple(xm.shape)} matrix")
    return lo.detach().float(), hi.detach().float()

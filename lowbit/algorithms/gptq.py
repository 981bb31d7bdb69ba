"""GPTQ: quantize a weight column by column, compensating each column's error on the columns not yet done.

Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", ICLR 2023,
Algorithm 1. With ``H = X^T X`` (``X``: the layer's inputs, one row per token), GPTQ minimises
``||(W - Q) X^T||^2`` greedily: after rounding column ``j`` the error ``err = (w_j - q_j) / Hinv[j, j]`` is
spread over the remaining columns through the upper Cholesky factor of ``H^-1``. Columns are processed in
blocks ("lazy batch updates") so the big update is one matrix product per block.

Options follow the paper and its reference implementation: dampening ``percdamp * mean(diag H)``, act-order
(columns by decreasing ``diag H``) with static groups (every group's range fixed from the original weight,
so groups stay contiguous in the stored layout), any group size, any lowbit format whose scales do not
depend on the whole tensor (everything except fp8-scaled NVFP4-style specs).

With ``clip_search`` every tile's range is chosen before the column loop by the Hessian-weighted clipping
search (:func:`~lowbit.observers.clip_search.mse_clip_search` with ``hessian=H``, AWQ's ``auto_clip``
objective) on the original weight, and kept fixed (static groups), as when GPTQ runs after AWQ's clipping.

Wherever the grid is fixed before the loop and is an integer one without float minimums (the defaults), each
block's column loop runs in C++ (``lowbit_gptq_block`` in ``lowbit/kernels/csrc/gptq.cpp``; rows are independent
then, so it runs row by row on torch's threads) with the Python loop's arithmetic, giving the same weights bit for
bit; elsewhere, or without the native library, the loop runs in Python.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import ClassVar, Mapping

import torch

from lowbit import native
from lowbit.algorithms.config import AlgorithmConfig, WeightResult, stat
from lowbit.errors import InputError
from lowbit.formats import QuantizedTensor, all_finite, default_range, grid_shape, quantize
from lowbit.observers.clip_search import mse_clip_search
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQ(AlgorithmConfig):
    """GPTQ: column-by-column rounding whose errors the remaining columns absorb (Frantar et al. 2023).

    Attributes:
        percdamp: dampening added to ``diag(H)``, as a fraction of its mean.
        block_size: columns per lazy batch update.
        act_order: process columns by decreasing ``diag(H)`` (with static group ranges).
        clip_search: choose every tile's range up front by the Hessian-weighted clipping search (static ranges).
            Both default to on: on SmolLM2-135M at int4-g64-asym (32 x 512 calibration tokens, perplexity over
            4,096 Wikipedia tokens) plain GPTQ with ranges re-fitted per group as the columns are updated gave
            27.25, worse than round to nearest (26.66); act-order with static groups 24.70, static clipped
            ranges alone 25.06, both 24.32.
        grid: ratios tried by that search (``1 - k * max_shrink / grid``, ``k = 0 .. grid - 1``).
        max_shrink: how far the search may shrink a range, in ``[0, 1)``.
        true_sequential: inside ``quantize()``, solve each transformer block in stages (q/k/v, then the
            output projection observed after them, then the MLP's input projections, then its output one), so
            every layer's Hessian comes from inputs that already went through the quantized layers before it
            in the block. Costs a partial block pass per stage (about 1.35x the calibration time on
            SmolLM2-135M).
    """

    percdamp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    clip_search: bool = True
    grid: int = 20
    max_shrink: float = 0.5
    true_sequential: bool = False

    name: ClassVar[str] = "gptq"
    stats_needed: ClassVar[tuple[str, ...]] = ("hessian",)

    def __post_init__(self) -> None:
        if isinstance(self.percdamp, bool) or not isinstance(self.percdamp, (int, float)) or not 0 < self.percdamp < 1:
            raise InputError(f"gptq: percdamp must be a number in (0, 1), got {self.percdamp!r}")
        object.__setattr__(self, "percdamp", float(self.percdamp))
        if isinstance(self.block_size, bool) or not isinstance(self.block_size, int) or self.block_size < 1:
            raise InputError(f"gptq: block_size must be a positive integer, got {self.block_size!r}")
        for f in ("act_order", "clip_search", "true_sequential"):
            if not isinstance(getattr(self, f), bool):
                raise InputError(f"gptq: {f} must be true or false, got {getattr(self, f)!r}")
        if isinstance(self.grid, bool) or not isinstance(self.grid, int) or self.grid < 1:
            raise InputError(f"gptq: grid must be a positive integer, got {self.grid!r}")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) \
                or not 0.0 <= self.max_shrink < 1.0:
            raise InputError(f"gptq: max_shrink must be a number in [0, 1), got {self.max_shrink!r}")
        object.__setattr__(self, "max_shrink", float(self.max_shrink))

    def run(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor], spec: QuantSpec,
            ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> WeightResult:
        """:func:`gptq` on ``W`` with the layer's input Hessian (within ``ranges`` when given)."""
        return WeightResult(gptq(W, stat(stats, "hessian", "gptq"), spec, self, ranges))


def gptq(
    W: torch.Tensor,
    H: torch.Tensor,
    spec: QuantSpec,
    config: GPTQ = GPTQ(),
    ranges: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> QuantizedTensor:
    """Quantize ``W`` (``(rows, cols)`` float) to ``spec`` minimising ``||(W - Q) X^T||^2`` for ``H = X^T X``.

    Args:
        W: the weight, lowbit layout ``(out, in)``.
        H: ``(cols, cols)`` symmetric positive semi-definite input second moment.
        ranges: optional ``(lo, hi)``, float ``(gr, gc)`` each: static tile ranges chosen by the caller (AWQ's
            clipping search, say); then ``config.clip_search`` is not run.
    Returns:
        the QuantizedTensor; its dequantized value is exactly the ``Q`` the algorithm chose.
    Raises:
        InputError: shapes do not match, NaN/Inf, or a spec with a per-tensor fp8 scale (NVFP4-style).
    """
    if W.dim() != 2 or H.shape != (W.shape[1], W.shape[1]):
        raise InputError(f"gptq needs W (rows, cols) and H (cols, cols); got {tuple(W.shape)} and {tuple(H.shape)}")
    if spec.has_global_scale:
        raise InputError(f"gptq does not support {spec.name}: its per-tensor scale depends on every column")
    if not (all_finite(W) and all_finite(H)):
        raise InputError("gptq: the weight or the Hessian holds NaN/Inf")
    W = W.detach().float().clone()
    H = H.detach().float().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0

    # k-quant scales share one fp16 scale per 256 columns: the whole grid is fixed before the first column
    static = (config.act_order or config.clip_search or ranges is not None or spec.granularity != "group"
              or spec.has_super_scale)
    if ranges is not None:
        lo, hi = (r.detach().float().clone() for r in ranges)
        if tuple(lo.shape) != grid_shape(spec, W.shape) or tuple(hi.shape) != tuple(lo.shape):
            raise InputError(f"gptq: ranges of shape {tuple(lo.shape)}/{tuple(hi.shape)} do not match the scale "
                             f"grid {grid_shape(spec, W.shape)} of {spec.name} on a {tuple(W.shape)} weight")
    elif config.clip_search:  # (gr, gc): every tile's output-error-optimal range, fixed up front
        lo, hi = mse_clip_search(W, spec, hessian=H, grid=config.grid, max_shrink=config.max_shrink)
    else:
        lo, hi = default_range(W, spec)  # (gr, gc): every tile's range from the (dead-zeroed) original weight
    perm = torch.argsort(torch.diag(H), descending=True) if config.act_order else torch.arange(cols)
    W, H = W[:, perm], H[perm][:, perm]
    U = _inverse_cholesky(H, config.percdamp)  # (cols, cols) upper factor of H^-1

    grid = _ColumnGrid(spec, rows, cols, lo, hi)
    bc = grid.bc
    loop = _native_block() if static else None  # the C++ column loop, where the grid is fixed up front
    tables = grid.tables() if loop is not None else None  # (rows, gc) scale, safe divisor, zero point
    Q = torch.zeros_like(W)
    for i1 in range(0, cols, config.block_size):
        i2 = min(i1 + config.block_size, cols)
        W1, Err1 = W[:, i1:i2].clone(), torch.zeros(rows, i2 - i1)
        if tables is not None:  # the same loop in C++, row by row
            Q[:, i1:i2] = _native_columns(loop, W1, Err1, U[i1:i2, i1:i2], tables, perm[i1:i2] // bc, spec.bits)
            W[:, i2:] -= Err1 @ U[i1:i2, i2:]
            continue
        for i in range(i2 - i1):
            j = int(perm[i1 + i])  # the column's place in the stored layout
            g = j // bc
            if not static and j % bc == 0:  # a new group starts: its range from the error-updated weights
                block = torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :bc]
                grid.set_range(g, *(t[:, 0] for t in default_range(block, spec.with_(group_size=block.shape[1]))))
            w = W1[:, i]
            q = grid.round(w, g)
            Q[:, i1 + i] = q
            err = (w - q) / U[i1 + i, i1 + i]
            W1[:, i:] -= err[:, None] * U[i1 + i, i1 + i:i2][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    out = quantize(Q, spec, lo, hi)  # Q already lies on these grids: this only encodes it
    drift = (out.dequantize() - Q).abs().max().item()
    if drift > 1e-5 * max(Q.abs().max().item(), 1e-12):
        log.warning("gptq: encoding moved the chosen weights by up to %.3g", drift)
    return out


class _ColumnGrid:
    """Rounds one weight column at a time onto the grid of its tile (column group ``g``).

    Integer formats use ``formats.quantize``'s arithmetic (``round(w / scale + zero)``, clamped, then
    ``(code - zero) * scale``) on per-row tile parameters that ``quantize`` computes once per range: the
    same numbers as quantizing the column, a few tensor ops instead of a full ``quantize`` call per
    column (GPTQ visits every column). Other formats call ``quantize`` on the column.
    """

    def __init__(self, spec: QuantSpec, rows: int, cols: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.spec, self.rows, self.lo, self.hi = spec, rows, lo, hi  # lo, hi: (gr, gc), updated in place
        self.br, self.bc = spec.block(rows, cols)
        self.col_spec = None if spec.has_super_scale else QuantSpec(
            spec.format, spec.bits, spec.symmetric, "block", None, (self.br, 1), spec.scale_format)
        self.fast = spec.format == "int" and not spec.has_global_scale
        self._params: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]] = {}
        self._offset = None  # k-quant float minimums (rows, gc)
        if spec.has_super_scale:  # every tile's scale depends on its super-block's: all of them from the ranges
            t = quantize(torch.zeros(rows, cols), spec, lo, hi)
            safe = torch.where(t.scale > 0, t.scale, torch.ones_like(t.scale))
            self._params = {g: (t.scale[:, g], safe[:, g], None) for g in range(t.scale.shape[1])}
            self._offset = t.offset

    def tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """Every tile column's per-row scale, safe divisor and zero point (None: symmetric), each ``(rows, gc)``,
        for the C++ loop; None for grids it does not handle (non-integer formats, k-quant minimums)."""
        if not self.fast or self._offset is not None:
            return None
        cols = [self._column_params(g) for g in range(self.lo.shape[1])]
        zero = None if cols[0][2] is None else torch.stack([c[2] for c in cols], 1)
        return torch.stack([c[0] for c in cols], 1), torch.stack([c[1] for c in cols], 1), zero

    def set_range(self, g: int, lo: torch.Tensor, hi: torch.Tensor) -> None:
        """New ``(gr,)`` range for tile column ``g``."""
        self.lo[:, g], self.hi[:, g] = lo, hi
        self._params.pop(g, None)

    def _column_params(self, g: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Tile column ``g``'s ``(rows,)`` scale, safe divisor (zeros replaced by one) and zero point (or None)."""
        if g not in self._params:
            lo, hi = self.lo[:, g:g + 1], self.hi[:, g:g + 1]  # (gr, 1)
            t = quantize(torch.zeros(self.rows, 1), self.col_spec, lo, hi)  # scale, zero point per tile
            scale = t.scale[:, 0].repeat_interleave(self.br)[: self.rows]  # (rows,)
            zero = None if t.zero_point is None else t.zero_point[:, 0].float().repeat_interleave(self.br)[: self.rows]
            self._params[g] = (scale, torch.where(scale > 0, scale, torch.ones_like(scale)), zero)
        return self._params[g]

    def round(self, w: torch.Tensor, g: int) -> torch.Tensor:
        """``(rows,)`` column ``w`` of tile column ``g`` -> its quantized value ``(rows,)``."""
        if self._offset is not None:  # formats.quantize's float-minimum arithmetic: code * scale - offset
            scale, safe, _ = self._params[g]
            offset = self._offset[:, g]
            return torch.round((w + offset) / safe).clamp(0, 2**self.spec.bits - 1) * scale - offset
        if not self.fast:
            return quantize(w[:, None], self.col_spec, self.lo[:, g:g + 1], self.hi[:, g:g + 1]).dequantize()[:, 0]
        scale, safe, zero = self._column_params(g)
        if zero is not None:
            return (torch.round(w / safe + zero).clamp(0, 2**self.spec.bits - 1) - zero) * scale
        half = 2 ** (self.spec.bits - 1)
        return torch.round(w / safe).clamp(-half, half - 1) * scale


def _native_block():
    """lowbit's C++ column loop (``lowbit_gptq_block``), or None where the native library is unavailable."""
    from lowbit import native

    if native.why_unavailable() is not None:
        return None
    return native.function("lowbit_gptq_block")


def _native_columns(fn, W1: torch.Tensor, Err1: torch.Tensor, U: torch.Tensor,
                    tables: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], groups: torch.Tensor,
                    bits: int) -> torch.Tensor:
    """One lazy-batch block's column loop in C++: rounds and error-updates ``W1`` ``(rows, n)`` in place, fills
    ``Err1``; returns the block's quantized values. ``groups``: each column's tile column."""
    scale, safe, zero = (None if t is None else t[:, groups].contiguous() for t in tables)
    U = U.contiguous()
    Q = torch.empty_like(W1)
    rc = fn(W1.data_ptr(), U.data_ptr(), U.shape[1], scale.data_ptr(), safe.data_ptr(),
            None if zero is None else zero.data_ptr(), Q.data_ptr(), Err1.data_ptr(), W1.shape[0], W1.shape[1],
            bits, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"lowbit_gptq_block failed (code {rc}) on a {tuple(W1.shape)} block")
    return Q


def _inverse_cholesky(H: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp I)^-1``; raises damping tenfold (up to 4 times) if needed.

    The factorizations run on one thread: MKL's threaded Cholesky and Cholesky inverse round differently
    with 1 or 2 threads (torch 2.13, MKL 2024.2: ``cholesky_inverse`` already at 64 columns, ``cholesky`` at
    192 and more), and GPTQ would then give different weights, so different artifacts, on machines or runs with
    other ``torch.get_num_threads()``. Serial, they cost about ``n^3`` flops per layer (n = in_features).
    """
    damp = percdamp * float(torch.diag(H).mean())
    eye = torch.eye(H.shape[0])
    for attempt in range(5):
        with _one_thread():
            L, info = torch.linalg.cholesky_ex(H + damp * eye)
            if int(info) == 0:
                Hinv = torch.cholesky_inverse(L)
                U, info = torch.linalg.cholesky_ex(Hinv, upper=True)
        if int(info) == 0 and torch.isfinite(U).all():
            return U
        log.warning("gptq: Cholesky failed with damping %.3g (attempt %d); retrying with 10x more", damp, attempt + 1)
        damp *= 10
    raise InputError("gptq: the Hessian stays singular even with 10,000x the requested damping; "
                     "check the calibration data (too few tokens?)")


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """torch (and MKL) on one intra-op thread inside the block; the caller's setting is restored after."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)

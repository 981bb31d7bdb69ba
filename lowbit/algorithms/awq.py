"""AWQ: scale each input channel of a weight by its activation magnitude before quantizing it.

Lin et al., "AWQ: Activation-aware Weight Quantization for LLM Compression and Acceleration", MLSys 2024.
Weights that meet large activations matter most; multiplying input column ``j`` of ``W`` by ``s_j > 1``
(and the input by ``1 / s_j``) leaves the float output unchanged but shrinks that column's relative rounding
error (Sec. 3.2, Eq. 4-5). AWQ searches ``s = mean|x|^alpha`` over ``alpha`` in ``[0, 1)`` (Eq. 5), keeping
the ``alpha`` whose quantized output is closest to the float one, then shrinks every tile's range by the
same output-error search (``auto_clip`` in the paper's released code).

The output error over all calibration tokens ``X`` ``(n, cols)`` is computed from ``H = X^T X / n`` alone:
``||(W - W') X^T||^2 / n = trace((W - W') H (W - W')^T)``, so no samples are stored.

lowbit keeps ``s`` in the quantized linear itself (``QuantLinear.input_scale = 1 / s``): it needs no
foldable predecessor (a norm or a previous linear), so each linear gets its own search. The result can be
rounded to nearest or handed to GPTQ (``then=GPTQ()``); the paper reports the two methods combine.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, ClassVar, Mapping

import torch

from lowbit.algorithms.config import AlgorithmConfig, WeightResult, stat
from lowbit.algorithms.gptq import GPTQ
from lowbit.algorithms.rtn import RTN
from lowbit.errors import InputError
from lowbit.formats import QuantizedTensor, fake_quantize
from lowbit.formats import blocks as B
from lowbit.observers.clip_search import mse_clip_search
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

# the algorithms that may round AWQ's scaled weight (``then``), by name
_FOLLOWERS: dict[str, type] = {"rtn": RTN, "gptq": GPTQ}


@dataclass(frozen=True)
class AWQ(AlgorithmConfig):
    """Activation-aware weight quantization (per-input-channel scales searched on the output error).

    Attributes:
        grid: alphas tried: ``0, 1/grid, ..., (grid - 1)/grid``.
        clip: after scaling, choose every tile's range by the Hessian-weighted clipping search and clamp the
            scaled weight into it.
        clip_grid: ratios tried by that search (``1 - k * max_shrink / clip_grid``).
        max_shrink: how far the clipping search may shrink a range, in ``[0, 1)``.
        then: the algorithm that rounds the scaled, clipped weight, within the clipped ranges: None (round to
            nearest), an :class:`RTN` or a :class:`GPTQ` config (static groups; the follower's own clipping
            search runs only when ``clip`` is off).
    """

    grid: int = 20
    clip: bool = True
    clip_grid: int = 20
    max_shrink: float = 0.5
    then: Any = None

    name: ClassVar[str] = "awq"
    stats_needed: ClassVar[tuple[str, ...]] = ("hessian", "abs_mean")

    def __post_init__(self) -> None:
        for f in ("grid", "clip_grid"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"awq: {f} must be a positive integer, got {v!r}")
        if not isinstance(self.clip, bool):
            raise InputError(f"awq: clip must be true or false, got {self.clip!r}")
        if isinstance(self.max_shrink, bool) or not isinstance(self.max_shrink, (int, float)) \
                or not 0.0 <= self.max_shrink < 1.0:
            raise InputError(f"awq: max_shrink must be a number in [0, 1), got {self.max_shrink!r}")
        object.__setattr__(self, "max_shrink", float(self.max_shrink))
        if self.then is not None and not isinstance(self.then, tuple(_FOLLOWERS.values())):
            got = self.then.get("name") if isinstance(self.then, dict) else self.then
            raise InputError(f"awq: then must be null (round to nearest), an rtn or a gptq config, got {got!r}; "
                             f"e.g. then: {{name: gptq}} or method 'awq+gptq'")

    def to_dict(self) -> dict[str, Any]:
        """``{"name": "awq", ..., "then": None | {"name": "gptq", ...}}``."""
        d = super().to_dict()
        d["then"] = None if self.then is None else self.then.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AWQ":
        """Inverse of :meth:`to_dict`; ``then`` may be null, ``"rtn"``, ``"gptq"`` or such a settings dict
        (anything else raises InputError)."""
        d = dict(d)
        then = d.get("then")
        if isinstance(then, str) and then.strip().lower() in _FOLLOWERS:
            d["then"] = _FOLLOWERS[then.strip().lower()]()
        elif isinstance(then, dict) and then.get("name") in _FOLLOWERS:
            d["then"] = _FOLLOWERS[then["name"]].from_dict(then)
        return super().from_dict(d)

    def run(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor], spec: QuantSpec,
            ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> WeightResult:
        """:func:`awq` on ``W``; the layer multiplies its input by ``1 / s``. AWQ chooses its own ranges."""
        if ranges is not None:
            raise InputError("awq chooses its own scales and ranges; it cannot follow another algorithm")
        tied = int(stats["columns_per_input"]) if "columns_per_input" in stats else 1  # a convolution's kernel
        q, s = awq(W, stat(stats, "hessian", "awq"), stat(stats, "abs_mean", "awq"), spec, self, tied)
        return WeightResult(q, 1.0 / s)


def awq(
    W: torch.Tensor, H: torch.Tensor, abs_mean: torch.Tensor, spec: QuantSpec, config: AWQ = AWQ(), tied: int = 1
) -> tuple[QuantizedTensor, torch.Tensor]:
    """Quantize ``W`` activation-aware: search ``s``, clip, round (or GPTQ) ``W * s``.

    Args:
        W: ``(rows, cols)`` float weight, lowbit layout ``(out, in)``.
        H: ``(cols, cols)`` input second moment ``X^T X / n``.
        abs_mean: ``(cols,)`` mean ``|x|`` per input feature.
        spec: the weight format.
        config: the settings.
        tied: consecutive columns sharing one input (a convolution's kernel positions of one input channel,
            whose ``abs_mean`` is the same): they get one scale.
    Returns:
        ``(q, s)``: ``q`` quantizes ``W * s[None, :]`` (scaled and clipped) and ``s`` is float32 ``(cols,)``,
        positive. The layer computes ``y = (x / s) @ dequantize(q).T``, i.e. ``x @ (dequantize(q) / s).T``.
    Raises:
        InputError: shapes do not match, NaN/Inf, negative ``abs_mean``, or a spec GPTQ cannot take.
    """
    W, H, abs_mean = _checked(W, H, abs_mean)
    s = awq_scales(W, H, abs_mean, spec, config.grid, tied)  # (cols,)
    Ws = W * s[None, :]  # (rows, cols): what gets quantized
    Hs = H / (s[:, None] * s[None, :])  # (cols, cols): the Hessian of the scaled inputs x / s
    lo = hi = None
    if config.clip:
        lo, hi = mse_clip_search(Ws, spec, hessian=Hs, grid=config.clip_grid, max_shrink=config.max_shrink)
        Ws = _clamp_to_tiles(Ws, spec, lo, hi)
    follower = config.then if config.then is not None else RTN()  # rounds within AWQ's clipped ranges, or
    return follower.run(Ws, {"hessian": Hs}, spec, None if lo is None else (lo, hi)).q, s  # searches its own


def awq_scales(
    W: torch.Tensor, H: torch.Tensor, abs_mean: torch.Tensor, spec: QuantSpec, grid: int = 20, tied: int = 1
) -> torch.Tensor:
    """AWQ's per-input-channel scales: ``s = mean|x|^alpha`` with the best ``alpha`` (Eq. 5).

    For ``alpha = k / grid``, ``k = 0 .. grid - 1``: ``s = abs_mean.clamp(min=1e-8) ** alpha``, normalised by
    ``sqrt(s.max() * s.min())`` as in the released code, and the loss ``trace((W - W') H (W - W')^T)`` with
    ``W' = fq(W * s) / s`` (fake quantization under ``spec``, per-tile min/max ranges). ``alpha = 0`` is
    ``s = 1`` (plain round to nearest), so the chosen loss never exceeds RTN's. Dead inputs
    (``abs_mean == 0`` or ``diag(H) == 0``) keep ``s = 1`` and take no part in the normalisation.

    Args:
        W: ``(rows, cols)`` float; H: ``(cols, cols)``; abs_mean: ``(cols,)`` non-negative; grid: >= 1;
        tied: consecutive columns that are one input (equal ``abs_mean``) share live-ness, hence one scale.
    Returns:
        float32 ``(cols,)``, every entry > 0.
    """
    if isinstance(grid, bool) or not isinstance(grid, int) or grid < 1:
        raise InputError(f"awq: grid must be a positive integer, got {grid!r}")
    W, H, abs_mean = _checked(W, H, abs_mean)
    live = (abs_mean > 0) & (torch.diag(H) > 0)  # (cols,)
    if tied > 1:  # one input's columns live or dead together (a border position a kernel never sees is dead)
        if live.numel() % tied:
            raise InputError(f"awq: {live.numel()} columns are not groups of {tied}")
        live = live.reshape(-1, tied).any(1).repeat_interleave(tied)
    ones = torch.ones_like(abs_mean)
    if not bool(live.any()):
        return ones
    best_loss, best_s, best_alpha = float("inf"), ones, 0.0
    for k in range(grid):
        alpha = k / grid
        s = _scales(abs_mean, live, alpha)  # (cols,)
        D = W - fake_quantize(W * s[None, :], spec) / s[None, :]  # (rows, cols)
        loss = float(((D @ H) * D).double().sum())  # fp32 product (the cost), fp64 sum
        if loss < best_loss:
            best_loss, best_s, best_alpha = loss, s, alpha
    log.debug("awq: alpha %.3g (output error %.4g) for a %s weight", best_alpha, best_loss, tuple(W.shape))
    return best_s


def _scales(abs_mean: torch.Tensor, live: torch.Tensor, alpha: float) -> torch.Tensor:
    """``abs_mean ** alpha`` normalised by ``sqrt(max * min)`` over the live inputs; 1 on dead ones."""
    if alpha == 0:
        return torch.ones_like(abs_mean)
    s = abs_mean.clamp(min=1e-8).pow(alpha)
    sl = s[live]
    s = s / (sl.max() * sl.min()).sqrt()
    return torch.where(live, s, torch.ones_like(s))


def _clamp_to_tiles(x: torch.Tensor, spec: QuantSpec, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """Clamp ``x`` ``(rows, cols)`` into the span each tile's ``(gr, gc)`` range represents under ``spec``:
    ``[min(lo, 0), max(hi, 0)]`` with a zero point, ``[-m, m]``, ``m = max(|lo|, |hi|)``, without."""
    if spec.has_zero_point:
        a, b = lo.clamp(max=0), hi.clamp(min=0)
    else:
        b = torch.maximum(lo.abs(), hi.abs())
        a = -b
    xb = B.to_blocks(x, spec)  # (gr, br, gc, bc)
    xb = torch.minimum(torch.maximum(xb, B.expand(a)), B.expand(b))
    return B.from_blocks(xb, x.shape)


def _checked(W: Any, H: Any, abs_mean: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 copies of the inputs, validated."""
    for what, t in (("W", W), ("H", H), ("abs_mean", abs_mean)):
        if not isinstance(t, torch.Tensor):
            raise InputError(f"awq: {what} must be a tensor, got {type(t).__name__}")
    if W.dim() != 2 or W.numel() == 0:
        raise InputError(f"awq needs a non-empty 2-D weight (out, in), got shape {tuple(W.shape)}")
    cols = W.shape[1]
    if tuple(H.shape) != (cols, cols) or tuple(abs_mean.shape) != (cols,):
        raise InputError(f"awq needs H ({cols}, {cols}) and abs_mean ({cols},) for a weight {tuple(W.shape)}; got "
                         f"H {tuple(H.shape)} and abs_mean {tuple(abs_mean.shape)}")
    W, H, abs_mean = W.detach().float(), H.detach().float(), abs_mean.detach().float()
    for what, t in (("the weight", W), ("the Hessian", H), ("abs_mean", abs_mean)):
        if not torch.isfinite(t).all():
            raise InputError(f"awq: {what} holds NaN/Inf; check the model and the calibration data")
    if bool((abs_mean < 0).any()):
        raise InputError("awq: abs_mean must be non-negative (the mean |x| of each input feature)")
    return W, H, abs_mean

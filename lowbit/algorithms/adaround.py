"""AdaRound: learn for every weight whether it rounds up or down, on the layer's output error.

Nagel et al., "Up or Down? Adaptive Rounding for Post-Training Quantization", ICML 2020. Round to nearest
minimizes each weight's own error; what matters is the layer's output. On the grid of round to nearest
(same scales and zero points), each weight's code is ``floor(w / s + z) + h(V)`` with ``h`` the rectified
sigmoid ``clip(sigmoid(V) (zeta - gamma) + gamma, 0, 1)`` (eq. 23, ``zeta = 1.1``, ``gamma = -0.1``), and
``V`` minimizes (eq. 25)

    ||(W~ - W) X^T||_F^2 / ||(W_rtn - W) X^T||_F^2  +  lambda * mean(1 - |2 h(V) - 1|^beta)

where the output error of a linear layer (or of a convolution through its input patches) is, with the input
Hessian ``H = X^T X / n``, ``tr(dW H dW^T)``: the reconstruction needs only ``H``, which lowbit's block-by-block
calibration already observes on the inputs of the quantized layers before it (the paper's "asymmetric
reconstruction" option). The first term is measured relative to round to nearest, so ``lambda`` does not
depend on the scale of a layer's activations. ``beta`` is annealed from 20 to 2 after a warm-up with no
regularization (the first ``warmup`` of the iterations); at the end every ``h`` is rounded to 0 or 1, so the
result lies on the round-to-nearest grid. Optimization: Adam on ``V`` (torch autograd, CPU).

Integer formats only (the grid must be uniform); granularity, groups and symmetric/asymmetric as the spec says.
The returned weight never has a higher Hessian-weighted error than round to nearest: if the learned rounding
ends worse (too few iterations), round to nearest is kept and logged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace
from typing import ClassVar, Mapping

import torch

from lowbit.algorithms.config import AlgorithmConfig, WeightResult, stat
from lowbit.errors import InputError
from lowbit.formats import QuantizedTensor, quantize
from lowbit.formats import blocks as B
from lowbit.observers.clip_search import mse_clip_search
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

ZETA, GAMMA = 1.1, -0.1  # the rectified sigmoid's stretch (eq. 23)


@dataclass(frozen=True)
class AdaRound(AlgorithmConfig):
    """AdaRound (Nagel et al. 2020) on the layer's output error through its input Hessian.

    Attributes:
        iters: Adam steps per layer.
        lr: Adam's learning rate on ``V``.
        reg: ``lambda``, the weight of the rounding regularizer.
        beta: ``(start, end)`` of the regularizer's exponent, annealed linearly after the warm-up.
        warmup: fraction of the iterations before the regularizer starts.
        clip_search: start from the ranges of the Hessian-weighted clipping search instead of min/max.

    The defaults were chosen on one layer of ``fmnist-resnet`` (``blocks.1.conv2``, int3 per channel, 256
    calibration images): output error relative to round to nearest (with the same clipping) 0.99x with the
    paper's ``lambda = 0.01`` (its scale differs: it sums the regularizer over weights and the error over
    outputs), 0.36x at ``lambda = 1``, 0.29x at ``lambda = 10`` (``lr = 0.03``, 2000 steps; 4000 steps: 0.28x).
    """

    iters: int = 2000
    lr: float = 3e-2
    reg: float = 10.0
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    clip_search: bool = True

    name: ClassVar[str] = "adaround"
    stats_needed: ClassVar[tuple[str, ...]] = ("hessian",)
    grouped_hessian: ClassVar[bool] = True  # takes a grouped convolution's (groups, cols, cols) Hessian

    def __post_init__(self) -> None:
        if isinstance(self.iters, bool) or not isinstance(self.iters, int) or self.iters < 1:
            raise InputError(f"adaround: iters must be a positive integer, got {self.iters!r}")
        for f, lo, hi in (("lr", 0.0, math.inf), ("reg", 0.0, math.inf), ("warmup", 0.0, 1.0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < hi or (f == "lr" and v == 0):
                raise InputError(f"adaround: {f} must be a number in [{lo}, {hi}){' and positive' if f == 'lr' else ''}, "
                                 f"got {v!r}")
            object.__setattr__(self, f, float(v))
        beta = tuple(self.beta) if isinstance(self.beta, (list, tuple)) else None
        if beta is None or len(beta) != 2 or not all(isinstance(b, (int, float)) and b > 0 for b in beta):
            raise InputError(f"adaround: beta must be two positive numbers (start, end), got {self.beta!r}")
        object.__setattr__(self, "beta", (float(beta[0]), float(beta[1])))
        if not isinstance(self.clip_search, bool):
            raise InputError(f"adaround: clip_search must be true or false, got {self.clip_search!r}")

    def run(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor], spec: QuantSpec,
            ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> WeightResult:
        """:func:`adaround` on ``W`` with the layer's input Hessian (on the grid of ``ranges`` when given)."""
        return WeightResult(adaround(W, stat(stats, "hessian", "adaround"), spec, self, ranges))


def adaround(W: torch.Tensor, H: torch.Tensor, spec: QuantSpec, config: AdaRound = AdaRound(),
             ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> QuantizedTensor:
    """Learned rounding of ``W`` ``(rows, cols)`` to the integer ``spec``, for input Hessian ``H`` ``(cols, cols)``,
    or ``(groups, cols, cols)`` for a grouped convolution (rows ``g * rows / groups ..`` read group ``g``'s inputs).

    Returns a :class:`QuantizedTensor` with round to nearest's scales and zero points (of ``ranges``, of the
    clipping search, or of min/max) and learned codes. Raises InputError for a non-integer format or a
    Hessian that does not match ``W``.
    """
    if spec.format != "int":
        raise InputError(f"adaround rounds on a uniform integer grid; {spec.name} is not an integer format")
    groups = H.shape[0] if H.dim() == 3 else 1
    if W.dim() != 2 or H.shape[-2:] != (W.shape[1], W.shape[1]) or H.dim() not in (2, 3) or W.shape[0] % groups:
        raise InputError(f"adaround: Hessian of shape {tuple(H.shape)} does not fit a weight of shape {tuple(W.shape)}")
    with torch.inference_mode(False):  # block-by-block calibration runs in inference mode; this learns
        return _adaround(W.detach().float().clone(), H.detach().float().clone(), spec, config, ranges, groups)


def _adaround(Wf: torch.Tensor, H: torch.Tensor, spec: QuantSpec, config: AdaRound,
              ranges: tuple[torch.Tensor, torch.Tensor] | None, groups: int) -> QuantizedTensor:
    """:func:`adaround` on ordinary (not inference-mode) float32 tensors."""
    if ranges is None and config.clip_search:  # a grouped Hessian: the search weighs each column by its diagonal
        ranges = mse_clip_search(Wf, spec, hessian=H) if groups == 1 else \
            mse_clip_search(Wf, spec, importance=H.diagonal(dim1=1, dim2=2).mean(0))
    if ranges is not None:
        ranges = (ranges[0].clone(), ranges[1].clone())
    q0 = quantize(Wf, spec, *ranges) if ranges is not None else quantize(Wf, spec)
    S, Z, qmax = _grid(q0)  # (rows, cols) each
    x = Wf / torch.where(S > 0, S, torch.ones_like(S)) + Z  # the weight in code units (an all-zero tile: Z)
    base = torch.floor(x)
    rest = (x - base).clamp(1e-4, 1 - 1e-4)
    V = (-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)).requires_grad_(True)  # h(V) = rest at the start

    def weight(h: torch.Tensor) -> torch.Tensor:
        return S * ((base + h).clamp(0, qmax) - Z)

    def row_err(Wq: torch.Tensor) -> torch.Tensor:  # each row's dw H dw^T (its group's H), shape (rows,)
        dW = (Wq - Wf).reshape(groups, -1, Wf.shape[1])  # (groups, rows / groups, cols)
        return ((dW @ H.reshape(groups, *H.shape[-2:])) * dW).sum(-1).reshape(-1)

    def out_err(Wq: torch.Tensor) -> torch.Tensor:  # tr(dW H dW^T), summed over groups
        return row_err(Wq).sum()

    with torch.no_grad():
        err_rtn = out_err(q0.dequantize())
    if float(err_rtn) <= 0:
        return q0
    opt = torch.optim.Adam([V], lr=config.lr)
    warm = int(config.warmup * config.iters)
    with torch.enable_grad():
        for it in range(config.iters):
            h = _rect_sigmoid(V)
            loss = out_err(weight(h)) / err_rtn
            if it >= warm:
                t = (it - warm) / max(config.iters - warm, 1)
                beta = config.beta[0] + (config.beta[1] - config.beta[0]) * t
                loss = loss + config.reg * (1 - (2 * h - 1).abs().pow(beta)).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        codes = (base + (_rect_sigmoid(V) >= 0.5).float()).clamp(0, qmax)
        # the error is a sum over rows, so each row keeps the better of its learned and its nearest codes
        rtn_codes = q0.codes.reshape(codes.shape).float()
        worse = row_err(S * (codes - Z)) > row_err(S * (rtn_codes - Z))
        codes = torch.where(worse[:, None], rtn_codes, codes)
        err = out_err(S * (codes - Z))
    if bool(worse.all()):
        log.info("adaround: the learned rounding did not lower any row's output error after %d iterations; round "
                 "to nearest kept (raise iters)", config.iters)
        return q0
    if bool(worse.any()):  # usual for a few rows; debug only
        log.debug("adaround: %d of %d rows kept round to nearest, their learned rounding being worse after %d "
                  "iterations (raise iters)", int(worse.sum()), worse.numel(), config.iters)
    log.debug("adaround: output error %.3gx round to nearest's", float(err / err_rtn))
    return replace(q0, codes=codes.to(torch.uint8).reshape(q0.codes.shape))


def _rect_sigmoid(V: torch.Tensor) -> torch.Tensor:
    return (torch.sigmoid(V) * (ZETA - GAMMA) + GAMMA).clamp(0, 1)


def _grid(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Per-element scale and zero point ``(rows, cols)`` of an integer ``q`` (codes ``0 .. qmax``), and ``qmax``."""
    spec = q.spec
    ones = torch.ones_like(B.to_blocks(q.codes, spec), dtype=torch.float32)  # (gr, br, gc, bc)
    scale = q.scale.float() if q.global_scale is None else q.scale.float() * q.global_scale.float()
    if spec.has_float_min:  # k-quant minimums: code * scale - offset, a fractional zero point offset / scale
        zp = q.offset / torch.where(scale > 0, scale, torch.ones_like(scale))
    else:
        zp = q.zero_point.float() if q.zero_point is not None else torch.full_like(scale, 2.0 ** (spec.bits - 1))
    S = B.from_blocks(ones * B.expand(scale), q.shape).reshape(q.codes.shape[0], -1)
    Z = B.from_blocks(ones * B.expand(zp), q.shape).reshape(q.codes.shape[0], -1)
    return S, Z, 2**spec.bits - 1

"""Histogram observer: the entropy (KL-divergence) calibration of TensorRT's int8 mode.

After S. Migacz, "8-bit Inference with TensorRT", GTC 2017: collect a histogram of ``|x|``; for each
candidate threshold ``T`` (a bin edge), let P be the histogram up to ``T`` with the mass beyond ``T`` added to
its last bin, and Q the histogram up to ``T`` quantized onto the format's levels (each level's mass spread
evenly over the non-empty bins that round to it); pick the ``T`` minimizing ``KL(P || Q)`` (the largest
one on ties, as NVIDIA's pytorch-quantization does).

Differences from the slides, each for a reason:

* Bins are mapped to levels by ``quantize`` itself (nearest level of the real format under range ``T``)
  instead of 128 equal-width intervals, so the same search serves int of any width, asymmetric int and
  FP8/FP4 grids.
* Exact zeros are counted apart and left out of P and Q: zero is always representable, and a spike at
  zero (after ReLU) would otherwise smear over the first level and bias the search towards small ``T``.
* The histogram has a fixed number of bins over ``[0, top]``; when data exceeds ``top``, ``top`` doubles and
  adjacent bins merge pairwise, which re-bins exactly (no interpolation). The first update sets ``top``,
  so the data always fill between half and all of the bins.
* ``T`` is capped at the largest ``|x|`` seen, which can only lower the error.

Asymmetric integer specs: non-negative data (e.g. after ReLU) gets ``lo = 0, hi = T`` and all ``2^bits``
levels; non-positive data the mirror image; data of both signs gets ``[max(-T, min), min(T, max)]``.
"""

from __future__ import annotations

from typing import Callable

import torch

from lowbit.errors import InputError
from lowbit.formats import quantize
from lowbit.observers.base import Observer
from lowbit.spec import QuantSpec

_CHUNK = 128  # candidate thresholds evaluated at once (memory ~ _CHUNK * bins * 8 bytes per temporary)


class HistogramObserver(Observer):
    """Per-tensor range from KL-divergence calibration over a histogram of ``|x|`` (see module docstring).

    Args:
        bins: histogram bins (even).
        start_bin: smallest candidate threshold, in bins (TensorRT: 128).
        stride: step between candidate thresholds, in bins.
    """

    name = "histogram"

    def __init__(self, spec: QuantSpec, bins: int = 2048, start_bin: int = 128, stride: int = 1) -> None:
        super().__init__(spec)
        if spec.granularity != "tensor":
            raise InputError(f"HistogramObserver supports per-tensor specs only, got {spec.name}; "
                             f"use a '-tensor' spec (e.g. int8-tensor) or the minmax/percentile/mse observers")
        for key, v in (("bins", bins), ("start_bin", start_bin), ("stride", stride)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"HistogramObserver: {key} must be a positive integer, got {v!r}")
        if bins % 2 or start_bin > bins:
            raise InputError(f"HistogramObserver: bins must be even and >= start_bin, got bins={bins}, "
                             f"start_bin={start_bin}")
        self.bins, self.start_bin, self.stride = bins, start_bin, stride
        self._hist = torch.zeros(bins, dtype=torch.float64)  # counts of nonzero |x| per bin over [0, top]
        self._top: float | None = None
        self._lo = torch.inf  # exact min and max of x
        self._hi = -torch.inf

    def __repr__(self) -> str:
        settings = f"bins={self.bins}, start_bin={self.start_bin}, stride={self.stride}"
        return f"HistogramObserver({self.spec.name}, {settings})"

    def _accumulate(self, x: torch.Tensor) -> None:  # x: (1, numel)
        self._lo, self._hi = min(self._lo, float(x.min())), max(self._hi, float(x.max()))
        a = x.abs().reshape(-1)
        a = a[a > 0]
        if a.numel() == 0:
            return
        amax = float(a.max())
        if self._top is None:
            self._top = amax
        while self._top < amax:  # double the range; bin j merges into bin j // 2
            self._top *= 2.0
            self._hist = torch.cat([self._hist.view(-1, 2).sum(1), torch.zeros(self.bins // 2, dtype=torch.float64)])
        idx = (a * (self.bins / self._top)).long().clamp_(max=self.bins - 1)  # (n,) bin of each value
        self._hist += torch.bincount(idx, minlength=self.bins).double()

    def _range(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self._top is None:  # only zeros seen
            return torch.zeros(1, 1), torch.zeros(1, 1)
        t = _kl_threshold(self._hist, self._top, self._levels, self.start_bin, self.stride)
        lo, hi = self._lo, self._hi
        if not self.spec.has_zero_point:
            amax = max(-lo, hi)
            lo, hi = -min(t, amax), min(t, amax)
        elif lo >= 0:
            lo, hi = 0.0, min(t, hi)
        elif hi <= 0:
            lo, hi = max(-t, lo), 0.0
        else:
            lo, hi = max(-t, lo), min(t, hi)
        return torch.tensor([[lo]]), torch.tensor([[hi]])

    def _levels(self, centers: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Level (code) of each bin center under threshold ``t``: ``centers`` ``(c, bins)``, ``t`` ``(c, 1)``."""
        spec = self.spec.with_(granularity="channel")  # one row per candidate threshold
        if self.spec.has_zero_point and self._lo >= 0:
            return quantize(centers, spec, torch.zeros_like(t), t).codes
        if self.spec.has_zero_point and self._hi <= 0:
            return quantize(-centers, spec, -t, torch.zeros_like(t)).codes
        return quantize(centers, spec, -t, t).codes


def _kl_threshold(
    hist: torch.Tensor,
    top: float,
    levels: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    start_bin: int,
    stride: int,
) -> float:
    """The threshold ``T = i * width`` minimizing ``KL(P || Q)`` over ``i = start_bin, start_bin + stride, ..``.

    ``hist``: float64 ``(bins,)`` counts over ``[0, top]``; ``levels(centers, t)`` gives each bin's level
    (an integer code < 256). Q is constant over the non-empty bins of a level, so
    ``sum_j P_j log Q_j = sum_level P(level) log Q(level)``, and ``sum_j P_j log P_j`` comes from a prefix
    sum: per candidate, only the level masses are computed bin by bin.
    """
    bins = hist.numel()
    width = top / bins
    cand = torch.arange(start_bin, bins + 1, stride)  # (n,) thresholds in bins
    total = float(hist.sum())
    beyond = total - torch.cumsum(hist, 0)  # (bins,) mass beyond bin j
    xlogx = torch.where(hist > 0, hist * torch.log(hist.clamp_min(1e-300)), 0.0)
    cum_xlogx = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(xlogx, 0)])  # (bins + 1,)
    j = torch.arange(bins)
    centers = ((j + 0.5) * width).float()  # (bins,)
    nonzero = (hist > 0).double()
    kl = []
    for c in cand.split(_CHUNK):
        n, rows = len(c), torch.arange(len(c))
        t = (c * width).float()[:, None]  # (n, 1)
        g = levels(centers.expand(n, bins).contiguous(), t).long()  # (n, bins) level of each bin
        g = torch.where(j[None, :] < c[:, None], g, torch.full_like(g, 256))  # bins beyond T: a dummy level
        mass = torch.zeros(n, 257, dtype=torch.float64).scatter_add_(1, g, hist.expand(n, bins))[:, :256]
        used = torch.zeros(n, 257, dtype=torch.float64).scatter_add_(1, g, nonzero.expand(n, bins))[:, :256]
        q_sum = mass.sum(1)  # (n,) mass inside T: Q's normalizer
        out = beyond[c - 1]  # (n,) outliers, added to P's last bin
        last_h = hist[c - 1]
        p_mass = mass.clone()
        p_mass[rows, g[rows, c - 1]] += out  # P's mass per level
        last_p = last_h + out
        plogp = (cum_xlogx[c - 1] + torch.where(last_p > 0, last_p * torch.log(last_p.clamp_min(1e-300)), 0.0)) / total
        # log Q of each level's bins: its mass spread over its non-empty bins, over Q's total
        log_q = torch.log(mass.clamp_min(1e-300) / used.clamp_min(1)) - torch.log(q_sum.clamp_min(1e-300))[:, None]
        plogq = torch.where(p_mass > 0, p_mass * log_q, 0.0).sum(1) / total
        d = plogp - plogq  # KL(P || Q); the log(total) terms cancel
        # P > 0 where Q = 0: outliers land in an empty last bin, or nothing lies inside T
        d = torch.where(((last_h == 0) & (out > 0)) | (q_sum == 0), torch.inf, d)
        kl.append(d)
    kl_all = torch.cat(kl)  # (n,)
    best = len(kl_all) - 1 - int(torch.argmin(kl_all.flip(0)))  # the last minimum: the largest T on ties
    return float(cand[best]) * width

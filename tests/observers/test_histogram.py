"""HistogramObserver: TensorRT-style KL calibration, checked against a plain loop over thresholds."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import InputError
from lowbit.formats import fake_quantize, quantize
from lowbit.observers import HistogramObserver
from lowbit.observers.histogram import _kl_threshold
from lowbit.spec import QuantSpec

INT8 = QuantSpec.parse("int8-tensor")


def _reference_threshold(hist: torch.Tensor, top: float, levels, start_bin: int, stride: int) -> float:
    """The slides' loop, one candidate at a time (P with outliers in the last bin, Q spread per level)."""
    bins = len(hist)
    width = top / bins
    h = hist.tolist()
    best_i, best_kl = None, math.inf
    for i in range(start_bin, bins + 1, stride):
        centers = torch.tensor([[(j + 0.5) * width for j in range(i)]], dtype=torch.float32)
        lv = levels(centers, torch.tensor([[i * width]], dtype=torch.float32))[0].tolist()
        p = h[:i]
        p[-1] += sum(h[i:])
        mass, used = {}, {}
        for j in range(i):
            if h[j] > 0:
                mass[lv[j]] = mass.get(lv[j], 0.0) + h[j]
                used[lv[j]] = used.get(lv[j], 0) + 1
        q = [mass[lv[j]] / used[lv[j]] if h[j] > 0 else 0.0 for j in range(i)]
        sp, sq = sum(p), sum(q)
        kl = 0.0
        for pj, qj in zip(p, q):
            if pj > 0:
                kl = math.inf if qj == 0 or sq == 0 else kl + pj / sp * math.log((pj / sp) / (qj / sq))
        if best_i is None or kl <= best_kl * (1 + 1e-12):  # ties: the larger threshold
            best_i, best_kl = i, kl
    return best_i * width


def _int_levels(spec):
    row = spec.with_(granularity="channel")
    return lambda centers, t: quantize(centers, row, -t, t).codes


@pytest.mark.parametrize("spec_name", ["int4-tensor", "int3-tensor", "fp4-e2m1-tensor"])
def test_vectorised_search_matches_the_loop(spec_name, gen):
    spec = QuantSpec.parse(spec_name)
    hist = torch.histc(torch.randn(20000, generator=gen).abs() ** 1.5, bins=96, min=0, max=9).double()
    hist[40] = 0.0  # an empty bin inside the data
    levels = _int_levels(spec)
    got = _kl_threshold(hist, 9.0, levels, start_bin=8, stride=1)
    want = _reference_threshold(hist, 9.0, levels, start_bin=8, stride=1)
    assert got == pytest.approx(want)


def _student_t(n: int, gen: torch.Generator, df: int = 3) -> torch.Tensor:
    """Student-t samples from a seeded generator: normal / sqrt(chi2_df / df)."""
    chi2 = torch.randn(n, df, generator=gen).pow(2).sum(1)
    return torch.randn(n, generator=gen) / torch.sqrt(chi2 / df)


def test_heavy_tails_get_a_threshold_below_the_max(gen):
    x = _student_t(50000, gen)
    obs = HistogramObserver(INT8)
    for b in x.split(10000):
        obs.update(b)
    r = obs.compute()
    amax = float(x.abs().max())
    assert float(r.hi) < 0.5 * amax
    assert float(r.lo) == -float(r.hi)
    # at 4 bits, where clipping pays most, the KL range also lowers the MSE vs min/max
    spec4 = QuantSpec.parse("int4-tensor")
    obs4 = HistogramObserver(spec4)
    obs4.update(x)
    r4 = obs4.compute()
    assert (fake_quantize(x, spec4, r4.lo, r4.hi) - x).pow(2).mean() < (fake_quantize(x, spec4) - x).pow(2).mean()


def test_uniform_data_gets_a_threshold_near_the_max(gen):
    x = torch.rand(50000, generator=gen) * 2 - 1
    obs = HistogramObserver(INT8)
    obs.update(x)
    r = obs.compute()
    assert float(r.hi) >= 0.98 * float(x.abs().max())


def test_relu_activations_get_lo_zero_with_an_asymmetric_spec(gen):
    spec = QuantSpec.parse("int8-tensor-asym")
    x = torch.relu(torch.randn(8, 1000, generator=gen))  # half exact zeros
    obs = HistogramObserver(spec)
    obs.update(x)
    r = obs.compute()
    assert float(r.lo) == 0.0 and 0.5 * float(x.max()) < float(r.hi) <= float(x.max())
    # both signs: the range stays within the data on each side
    y = torch.randn(8, 1000, generator=gen) + 1.0
    obs = HistogramObserver(spec)
    obs.update(y)
    r = obs.compute()
    assert float(y.min()) <= float(r.lo) < 0 < float(r.hi) <= float(y.max())


def test_range_growth_rebins_exactly(gen):
    small = torch.randn(1000, generator=gen) * 0.1
    big = torch.randn(1000, generator=gen) * 10
    obs = HistogramObserver(INT8, bins=64, start_bin=8)
    obs.update(small)
    obs.update(big)  # top doubles several times; counts merge pairwise
    assert obs._top >= float(big.abs().max()) and obs._top <= 2 * float(big.abs().max())
    assert float(obs._hist.sum()) == 2000
    # the same counts as binning everything with the final top at once
    a = torch.cat([small, big]).abs()
    direct = torch.bincount((a * (64 / obs._top)).long().clamp(max=63), minlength=64).double()
    assert torch.equal(obs._hist, direct)


def test_per_channel_and_bad_settings_raise():
    with pytest.raises(InputError, match="per-tensor"):
        HistogramObserver(QuantSpec.parse("int8"))
    with pytest.raises(InputError, match="even"):
        HistogramObserver(INT8, bins=101)
    with pytest.raises(InputError, match="start_bin"):
        HistogramObserver(INT8, bins=64, start_bin=128)
    with pytest.raises(InputError, match="stride"):
        HistogramObserver(INT8, stride=0)

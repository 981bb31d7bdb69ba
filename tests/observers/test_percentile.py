"""PercentileObserver: exact nearest-rank quantiles of values rounded to bfloat16, per tensor or per tile."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import InputError
from lowbit.formats import fake_quantize
from lowbit.observers import MinMaxObserver, PercentileObserver
from lowbit.spec import QuantSpec

SYM = QuantSpec.parse("int8-tensor")
ASYM = QuantSpec.parse("int8-tensor-asym")


def _nearest_rank(values: torch.Tensor, q: float) -> float:
    s = values.reshape(-1).sort().values
    return float(s[max(1, math.ceil(q * s.numel() - 1e-9 * q * s.numel())) - 1])


def _bf16_exact(n: int, gen: torch.Generator) -> torch.Tensor:
    """Integers in [-200, 200]: exactly representable in bfloat16, so the quantile must be exact."""
    return torch.randint(-200, 201, (n,), generator=gen).float()


@pytest.mark.parametrize("p", [99.99, 99.0, 90.0, 100.0])
def test_exact_quantiles_on_bf16_representable_data(p, gen):
    x = _bf16_exact(30000, gen)
    sym, asym = PercentileObserver(SYM, p), PercentileObserver(ASYM, p)
    for b in x.split(7000):
        sym.update(b)
        asym.update(b)
    assert float(sym.compute().hi) == _nearest_rank(x.abs(), p / 100) == -float(sym.compute().lo)
    assert float(asym.compute().hi) == _nearest_rank(x, p / 100)
    assert float(asym.compute().lo) == _nearest_rank(x, 1 - p / 100)


def test_streaming_equals_one_shot_exactly(gen):
    x = torch.randn(4, 5000, generator=gen).pow(3)
    a, b = PercentileObserver(ASYM, 99.9), PercentileObserver(ASYM, 99.9)
    for part in x:
        a.update(part)
    b.update(x)
    assert torch.equal(a.compute().lo, b.compute().lo) and torch.equal(a.compute().hi, b.compute().hi)


def test_close_to_the_exact_quantile_on_real_data(gen):
    x = torch.randn(100000, generator=gen)
    obs = PercentileObserver(SYM, 99.9)
    obs.update(x)
    exact = _nearest_rank(x.abs(), 0.999)
    assert abs(float(obs.compute().hi) - exact) <= 2**-8 * exact


def test_one_outlier_is_clipped(gen):
    x = torch.randn(20000, generator=gen)
    x[123] = 1000.0
    mm, pc = MinMaxObserver(SYM), PercentileObserver(SYM, 99.99)
    mm.update(x)
    pc.update(x)
    assert float(pc.compute().hi) < 10 < 1000 == float(mm.compute().hi)
    bulk = torch.ones_like(x, dtype=torch.bool)
    bulk[123] = False

    def bulk_mse(r):
        return float((fake_quantize(x, SYM, r.lo, r.hi) - x)[bulk].pow(2).mean())

    assert bulk_mse(pc.compute()) < 0.01 * bulk_mse(mm.compute())


def test_per_tile_quantiles(gen):
    spec = QuantSpec.parse("int8-g50-asym")  # 120 columns: tiles of 50, 50 and 20
    w = torch.randint(-100, 101, (3, 120), generator=gen).float()
    obs = PercentileObserver(spec, 95.0)
    obs.update(w)
    obs.update(w * 2)
    r = obs.compute()
    assert r.hi.shape == (3, 3)
    both = torch.stack([w, w * 2])  # (2, 3, 120)
    for i in range(3):
        for j, (c0, c1) in enumerate([(0, 50), (50, 100), (100, 120)]):
            tile = both[:, i, c0:c1]
            assert float(r.hi[i, j]) == _nearest_rank(tile, 0.95)
            assert float(r.lo[i, j]) == _nearest_rank(tile, 0.05)


def test_many_tiles_use_the_sparse_counts(gen):
    spec = QuantSpec.parse("int4-ch")  # 40 tiles > the dense limit
    w = torch.randint(-50, 51, (40, 64), generator=gen).float()
    obs = PercentileObserver(spec, 90.0)
    obs.update(w)
    want = torch.tensor([_nearest_rank(row.abs(), 0.9) for row in w])
    assert torch.equal(obs.compute().hi.reshape(-1), want)


@pytest.mark.parametrize("p", [0.0, 50.0, 100.5, True])
def test_bad_percentile(p):
    with pytest.raises(InputError, match="percentile"):
        PercentileObserver(SYM, p)

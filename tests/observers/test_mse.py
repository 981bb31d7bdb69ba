"""MSEObserver: the range of least squared quantization error over all data seen."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import InputError
from lowbit.formats import fake_quantize
from lowbit.observers import MinMaxObserver, MSEObserver
from lowbit.spec import QuantSpec


def _laplace(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def _student_t(shape: tuple[int, ...], gen: torch.Generator, df: int = 3) -> torch.Tensor:
    chi2 = torch.randn(*shape, df, generator=gen).pow(2).sum(-1)
    return torch.randn(shape, generator=gen) / torch.sqrt(chi2 / df)


def _mse(x, spec, r) -> float:
    return float((fake_quantize(x, spec, r.lo, r.hi) - x).double().pow(2).mean())


@pytest.mark.parametrize("spec_name", ["int8-tensor", "int8-tensor-asym", "fp8-e4m3-tensor", "int4-tensor"])
@pytest.mark.parametrize("dist", [_laplace, _student_t])
def test_no_worse_than_minmax_on_heavy_tails(spec_name, dist, gen):
    spec = QuantSpec.parse(spec_name)
    x = dist((20, 2000), gen)
    mse, mm = MSEObserver(spec), MinMaxObserver(spec)
    for b in x.split(5):
        mse.update(b)
        mm.update(b)
    assert _mse(x, spec, mse.compute()) <= _mse(x, spec, mm.compute())
    if spec.bits == 4:  # where clipping pays, it must help clearly
        assert _mse(x, spec, mse.compute()) < 0.7 * _mse(x, spec, mm.compute())


@pytest.mark.parametrize("spec_name", ["int4-ch", "int3-g64-asym"])
def test_per_tile_weights(spec_name, gen):
    spec = QuantSpec.parse(spec_name)
    w = _student_t((48, 256), gen)
    mse, mm = MSEObserver(spec, grid=40, max_shrink=0.7), MinMaxObserver(spec)
    mse.update(w)
    mm.update(w)
    assert _mse(w, spec, mse.compute()) < 0.9 * _mse(w, spec, mm.compute())


def test_streaming_equals_one_shot_exactly(gen):
    spec = QuantSpec.parse("int8-tensor-asym")
    x = _laplace((8, 3000), gen)
    a, b = MSEObserver(spec), MSEObserver(spec)
    for part in x:
        a.update(part)
    b.update(x)
    assert torch.equal(a.compute().lo, b.compute().lo) and torch.equal(a.compute().hi, b.compute().hi)


def test_uniform_data_keeps_nearly_the_full_range(gen):
    spec = QuantSpec.parse("int8-tensor")
    x = torch.rand(50000, generator=gen) * 2 - 1
    obs = MSEObserver(spec)
    obs.update(x)
    assert float(obs.compute().hi) >= 0.97 * float(x.abs().max())


def test_first_candidate_is_exactly_minmax(gen):
    spec = QuantSpec.parse("int8-tensor-asym")
    x = torch.randn(1000, generator=gen) * 3.3
    obs, mm = MSEObserver(spec, grid=1), MinMaxObserver(spec)
    obs.update(x)
    mm.update(x)
    assert torch.equal(obs.compute().lo, mm.compute().lo) and torch.equal(obs.compute().hi, mm.compute().hi)


@pytest.mark.parametrize("settings", [{"grid": 0}, {"grid": 2.5}, {"max_shrink": 1.0}, {"max_shrink": -0.1}])
def test_bad_settings(settings):
    with pytest.raises(InputError, match="MSEObserver"):
        MSEObserver(QuantSpec.parse("int8-tensor"), **settings)

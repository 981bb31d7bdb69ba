"""MinMaxObserver: exact running min/max per tile, and its moving-average variant."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import InputError
from lowbit.formats import default_range
from lowbit.observers import MinMaxObserver
from lowbit.spec import QuantSpec


@pytest.mark.parametrize("spec_name", ["int8-tensor", "int8-tensor-asym", "int4-ch", "int4-g64-asym", "int4-b4x8"])
def test_streaming_equals_one_shot_exactly(spec_name, gen):
    spec = QuantSpec.parse(spec_name)
    parts = [torch.randn(10, 100, generator=gen) * s for s in (1.0, 5.0, 0.1)]
    streamed = MinMaxObserver(spec)
    for p in parts:
        streamed.update(p)
    if spec.granularity == "tensor":  # one shot over everything at once
        whole = torch.cat(parts)
        once = MinMaxObserver(spec)
        once.update(whole)
        assert torch.equal(streamed.compute().lo, once.compute().lo)
        assert torch.equal(streamed.compute().hi, once.compute().hi)
        assert float(once.compute().lo) == float(whole.min()) and float(once.compute().hi) == float(whole.max())
    else:  # per tile: the elementwise envelope of the parts
        lo = torch.stack([default_range(p, spec)[0] for p in parts]).amin(0)
        hi = torch.stack([default_range(p, spec)[1] for p in parts]).amax(0)
        assert torch.equal(streamed.compute().lo, lo) and torch.equal(streamed.compute().hi, hi)


def test_single_update_equals_quantize_default_range(gen):
    spec = QuantSpec.parse("int4-g48-asym")  # 48 does not divide 100: edge tiles are padded
    w = torch.randn(6, 100, generator=gen)
    obs = MinMaxObserver(spec)
    obs.update(w)
    lo, hi = default_range(w, spec)
    assert torch.equal(obs.compute().lo, lo) and torch.equal(obs.compute().hi, hi)


def test_activations_of_any_leading_shape(gen):
    obs = MinMaxObserver(QuantSpec.parse("int8-tensor"))
    obs.update(torch.full((2, 3, 8), -1.0))
    obs.update(torch.full((5, 8), 2.0))
    r = obs.compute()
    assert (float(r.lo), float(r.hi)) == (-1.0, 2.0)


def test_moving_average():
    spec = QuantSpec.parse("int8-tensor-asym")
    obs = MinMaxObserver(spec, averaging_constant=0.5)
    obs.update(torch.tensor([-1.0, 1.0]))
    obs.update(torch.tensor([-3.0, 5.0]))
    r = obs.compute()
    assert (float(r.lo), float(r.hi)) == (-2.0, 3.0)
    last = MinMaxObserver(spec, averaging_constant=1.0)
    last.update(torch.tensor([-1.0, 9.0]))
    last.update(torch.tensor([-3.0, 5.0]))
    assert (float(last.compute().lo), float(last.compute().hi)) == (-3.0, 5.0)


@pytest.mark.parametrize("c", [0.0, 1.5, -0.1, True, "0.1"])
def test_bad_averaging_constant(c):
    with pytest.raises(InputError, match="averaging_constant"):
        MinMaxObserver(QuantSpec.parse("int8-tensor"), averaging_constant=c)

"""The contract every observer obeys, parametrized over the registry and a few specs.

Constructor stores settings; ``update`` accumulates (any leading shape per tensor, one fixed 2-D shape
otherwise); ``compute`` returns a frozen float32 ``Range`` on the scale grid, is repeatable, has no side
effects and lets updates continue; bad input (nothing seen, NaN/Inf, empty, shape change) raises InputError.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit.errors import InputError
from lowbit.formats import grid_shape, quantize
from lowbit.observers import OBSERVERS, Range, make_observer
from lowbit.spec import QuantSpec

PER_TENSOR = ["int8-tensor", "int8-tensor-asym", "fp8-e4m3-tensor"]
PER_TILE = ["int4-ch", "int4-g64-asym"]  # weights: one fixed shape
WEIGHT_CAPABLE = ["minmax", "percentile", "mse"]

CASES = [(o, s) for o in OBSERVERS for s in PER_TENSOR] + [(o, s) for o in WEIGHT_CAPABLE for s in PER_TILE]


def _batches(spec: QuantSpec, gen: torch.Generator) -> list[torch.Tensor]:
    """Heavy-ish tailed data: activations of varying leading shape per tensor, a fixed weight shape otherwise."""
    def t(*shape):
        return torch.randn(*shape, generator=gen) * torch.rand(*shape, generator=gen).pow(-0.5)
    if spec.granularity == "tensor":
        return [t(2, 5, 24), t(7, 24), t(3, 24)]
    return [t(12, 100), t(12, 100), t(12, 100)]


def _equal(a: Range, b: Range) -> bool:
    return torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)


@pytest.fixture(params=CASES, ids=[f"{o}-{s}" for o, s in CASES])
def case(request):
    name, spec_name = request.param
    return name, QuantSpec.parse(spec_name)


def test_range_on_scale_grid_and_usable(case, gen):
    name, spec = case
    obs = make_observer(name, spec)
    xs = _batches(spec, gen)
    for x in xs:
        obs.update(x)
    r = obs.compute()
    expected = (1, 1) if spec.granularity == "tensor" else grid_shape(spec, xs[0].shape)
    assert isinstance(r, Range)
    assert r.lo.shape == r.hi.shape == expected
    assert r.lo.dtype == r.hi.dtype == torch.float32
    assert bool((r.lo <= r.hi).all())
    lo, hi = r  # unpacks
    quantize(xs[0], spec, lo, hi)  # fits quantize's grid


def test_compute_is_repeatable_and_has_no_side_effects(case, gen):
    name, spec = case
    xs = _batches(spec, gen)
    a = make_observer(name, spec)
    a.update(xs[0])
    first = a.compute()
    assert _equal(first, a.compute())
    first.lo.add_(100.0)  # the caller owns the result; the observer's state is untouched
    assert not _equal(first, a.compute())
    for x in xs[1:]:
        a.update(x)  # updates continue after compute
    b = make_observer(name, spec)
    for x in xs:
        b.update(x)
    assert _equal(a.compute(), b.compute())


def test_range_is_frozen(case, gen):
    name, spec = case
    obs = make_observer(name, spec)
    obs.update(_batches(spec, gen)[0])
    with pytest.raises(dataclasses.FrozenInstanceError):
        obs.compute().lo = torch.zeros(1, 1)  # type: ignore[misc]


def test_deterministic(case):
    name, spec = case
    results = []
    for _ in range(2):
        obs = make_observer(name, spec)
        for x in _batches(spec, torch.Generator().manual_seed(3)):
            obs.update(x)
        results.append(obs.compute())
    assert _equal(*results)


def test_compute_before_update_raises(case):
    name, spec = case
    with pytest.raises(InputError, match="saw no data"):
        make_observer(name, spec).compute()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_input_raises(case, gen, bad):
    name, spec = case
    x = _batches(spec, gen)[0]
    x.view(-1)[5] = bad
    obs = make_observer(name, spec)
    with pytest.raises(InputError, match="NaN/Inf"):
        obs.update(x)
    with pytest.raises(InputError, match="saw no data"):  # the bad batch was not half-counted
        obs.compute()


def test_empty_and_non_tensor_input_raise(case):
    name, spec = case
    obs = make_observer(name, spec)
    with pytest.raises(InputError, match="empty"):
        obs.update(torch.zeros(0, 8))
    with pytest.raises(InputError, match="torch.Tensor"):
        obs.update([1.0, 2.0])  # type: ignore[arg-type]


def test_all_zero_data_gives_a_zero_range(case):
    name, spec = case
    obs = make_observer(name, spec)
    shape = (4, 24) if spec.granularity == "tensor" else (12, 100)
    obs.update(torch.zeros(shape))
    r = obs.compute()
    assert torch.equal(r.lo, torch.zeros_like(r.lo)) and torch.equal(r.hi, torch.zeros_like(r.hi))
    assert torch.equal(quantize(torch.zeros(shape), spec, r.lo, r.hi).dequantize(), torch.zeros(shape))


def test_low_precision_inputs_are_accepted(case, gen):
    name, spec = case
    obs = make_observer(name, spec)
    obs.update(_batches(spec, gen)[0].to(torch.bfloat16))
    assert obs.compute().lo.dtype == torch.float32


@pytest.mark.parametrize("name", WEIGHT_CAPABLE)
def test_per_tile_observers_need_one_shape(name, gen):
    obs = make_observer(name, QuantSpec.parse("int4-g64-asym"))
    obs.update(torch.randn(12, 100, generator=gen))
    with pytest.raises(InputError, match="fixed shape"):
        obs.update(torch.randn(13, 100, generator=gen))


def test_registry_names_and_errors():
    assert set(OBSERVERS) == {"minmax", "percentile", "mse", "histogram"}
    spec = QuantSpec.parse("int8-tensor")
    for name, cls in OBSERVERS.items():
        assert cls.name == name
        assert isinstance(make_observer(name, spec), cls)
    with pytest.raises(InputError, match="known: minmax, percentile, mse, histogram"):
        make_observer("kl", spec)
    with pytest.raises(InputError, match="no setting"):
        make_observer("minmax", spec, percentile=99.0)
    assert make_observer("percentile", spec, percentile=99.9).percentile == 99.9
    with pytest.raises(InputError, match="QuantSpec"):
        make_observer("minmax", "int8-tensor")  # type: ignore[arg-type]


def test_spec_knows_every_registered_observer_name():
    from lowbit.observers import OBSERVERS
    from lowbit.spec import OBSERVER_NAMES

    assert set(OBSERVER_NAMES) == set(OBSERVERS)

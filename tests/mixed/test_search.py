"""The mixed-precision search on tiny models: measures, groups, the plan and its recipe."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit import QuantPlan, quantize
from lowbit.errors import InputError
from lowbit.mixed import Budget, SearchResult, search
from lowbit.mixed import sensitivity as S
from lowbit.models.tiny import tiny_cnn, tiny_llama
from lowbit.nn.size import model_size

FORMATS = ["int2-g32-asym", "int4-g32-asym", "int8"]


def _ids(n=6, seq=32, seed=0):
    """``n`` sequences in batches of two."""
    ids = torch.randint(3, 200, (n, seq), generator=torch.Generator().manual_seed(seed))
    return list(ids.split(2))


def test_budget_parsing():
    assert Budget.parse("3.5bpw") == Budget("bpw", 3.5) and Budget.parse(4) == Budget("bpw", 4.0)
    assert Budget.parse("60MB") == Budget("bytes", 60e6) and Budget.parse("2 KiB") == Budget("bytes", 2048.0)
    assert Budget.parse("3.5bpw").limit(1000) == 3500 and Budget.parse("1kB").limit(10) == 8000
    assert Budget.parse("4ms") == Budget("seconds", 4e-3) and Budget.parse("800us").limit(10) == pytest.approx(8e-4)
    for bad in ("", "fast", "-3bpw", "0", "3.5 parsecs"):
        with pytest.raises(InputError, match="not a size or a time"):
            Budget.parse(bad)


def test_layers_fed_the_same_input_form_one_group():
    model = tiny_llama().eval()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    groups = S.input_groups(model, _ids(2)[0], names)
    assert ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj",
            "model.layers.0.self_attn.v_proj"] in groups
    assert ["model.layers.1.mlp.gate_proj", "model.layers.1.mlp.up_proj"] in groups
    assert ["model.layers.1.mlp.down_proj"] in groups and sorted(n for g in groups for n in g) == sorted(names)


@pytest.mark.parametrize("measure", ["proxy", "fisher", "hutchinson", "kl"])
def test_search_stays_within_budget_and_its_recipe_runs(measure, tmp_path):
    torch.manual_seed(0)
    model = tiny_llama().eval()
    data = _ids(8, 32)
    result = search(model, data, FORMATS, "5bpw", method="rtn", measure=measure, heldout=1, gradient_samples=2,
                    hutchinson_samples=2, progress=False)
    assert result.bits_per_weight <= 5.0 + 1e-9
    cost = result.measures[measure]
    assert len(cost) == len(result.groups) and all(len(r) == 3 for r in cost)
    assert all(c >= 0 for r in cost for c in r) if measure != "hutchinson" else all(map(math.isfinite, sum(cost, [])))
    # more bits, less error: for every group 8 bits predict no more error than 2 bits
    assert all(r[2] <= r[0] for r in cost) or measure == "hutchinson"
    # the recipe round-trips and quantizes to the size the search predicted
    path = tmp_path / "mixed.yaml"
    path.write_text(result.recipe())
    plan = QuantPlan.load(path)
    assert plan.to_dict() == result.plan().to_dict()
    q = quantize(tiny_llama().eval(), plan, data, progress=False)
    size = model_size(q)
    assert size.quantized_bytes * 8 == sum(b[k] for b, k in zip(result.bits, result.choice))
    assert size.bits_per_quantized_weight == pytest.approx(result.bits_per_weight)
    back = SearchResult.from_dict(result.to_dict())
    assert back.choice == result.choice and back.layer_specs() == result.layer_specs()


def test_a_tighter_budget_gives_fewer_bits_and_more_predicted_error():
    model = tiny_llama().eval()
    data = _ids(6, 32)
    loose = search(model, data, FORMATS, "6bpw", measure="proxy", heldout=1, progress=False)
    tight = search(model, data, FORMATS, "3bpw", measure="proxy", heldout=1, progress=False)
    assert tight.bits_per_weight <= 3.0 < loose.bits_per_weight
    assert tight.predicted >= loose.predicted
    again = loose.reallocate("3bpw")  # the same measurements, another budget: no model needed
    assert again.choice == tight.choice and again.bits_per_weight <= 3.0 and loose.choice != again.choice
    with pytest.raises(InputError, match="below the smallest"):
        loose.reallocate("1bpw")
    front = loose.front
    assert front[0][0] < front[-1][0] and front[0][1] >= front[-1][1]
    assert all(b2 > b1 and c2 <= c1 + 1e-12 for (b1, c1), (b2, c2) in zip(front, front[1:]))


def test_search_on_a_cnn():
    model = tiny_cnn().eval()
    images = list(torch.randn(24, 3, 32, 32, generator=torch.Generator().manual_seed(0)).split(8))
    result = search(model, images, ["int4-ch", "int8-ch"], "6bpw", measure="kl", heldout=1, progress=False)
    assert result.bits_per_weight <= 6.0 and set(result.layer_specs().values()) <= {"int4", "int8"}  # canonical names


def test_search_errors():
    model = tiny_llama().eval()
    data = _ids(4, 32)
    with pytest.raises(InputError, match="two distinct"):
        search(model, data, ["int4-g32-asym", "int4-g32-asym"], "4bpw", progress=False)
    with pytest.raises(InputError, match="unknown sensitivity"):
        search(model, data, FORMATS, "4bpw", measure="vibes", progress=False)
    with pytest.raises(InputError, match="below the smallest allocation"):
        search(model, data, FORMATS, "1bpw", measure="proxy", heldout=1, progress=False)
    with pytest.raises(InputError, match="more than 2 calibration samples"):
        search(model, _ids(2, 32), FORMATS, "4bpw", progress=False)


def test_spearman():
    assert S.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert S.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert S.spearman([1, 1, 2], [1, 1, 2]) == pytest.approx(1.0)
    with pytest.raises(InputError):
        S.spearman([1], [1])


def test_a_time_budget_allocates_against_the_layers_measured_time():
    model = tiny_llama().eval()
    data = _ids(6, 32)
    free = search(model, data, FORMATS, "1s", measure="proxy", heldout=1, progress=False)  # binds nothing
    assert free.latency and free.latency_tokens == 1 and free.calibration["threads"] >= 1
    assert len(free.latency) == len(free.groups) and all(t > 0 for row in free.latency for t in row)
    assert free.choice == [min(range(3), key=lambda k: (c[k], t[k])) for c, t in zip(free.cost, free.latency)]
    fastest = sum(min(row) for row in free.latency)
    tight = free.reallocate(Budget("seconds", fastest * 1.0001))
    assert tight.seconds_per_call <= fastest * 1.0001
    with pytest.raises(InputError, match="below the smallest allocation"):
        free.reallocate(Budget("seconds", fastest * 0.5))
    sized = search(model, data, FORMATS, "5bpw", measure="proxy", heldout=1, progress=False)
    with pytest.raises(InputError, match="no latency table"):
        sized.reallocate("2ms")


def test_a_time_budget_on_convolutions_is_refused_clearly():
    model = tiny_cnn().eval()
    images = list(torch.randn(16, 3, 32, 32, generator=torch.Generator().manual_seed(0)).split(8))
    with pytest.raises(InputError, match="times linear layers"):
        search(model, images, ["int4-ch", "int8-ch"], "1ms", measure="proxy", heldout=1, progress=False)

"""``quantize(model, plan, data)`` on a small model: selection, mixed precision, validation, calibration."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

import lowbit
from lowbit.algorithms import RTN
from lowbit.errors import InputError
from lowbit.nn import QuantConv2d, QuantEmbedding, QuantLinear, QuantModule
from lowbit.plan import QuantPlan, Rule
from lowbit.quantizer import quantize
from lowbit.spec import ActivationQuant, QuantSpec


class Small(nn.Module):
    """Embedding + Conv2d feature, a two-layer MLP, LayerNorm, head. Inputs: ids (B, T), image (B, 3, 8, 8)."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.embed = nn.Embedding(32, 16)
            self.conv = nn.Conv2d(3, 16, 3, padding=1)
            self.mlp = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
            self.norm = nn.LayerNorm(16)
            self.head = nn.Linear(16, 8)
        self.eval()

    def forward(self, ids: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.conv(img).mean((2, 3))[:, None, :]  # (B, T, 16)
        h = h + self.mlp(h)
        return self.head(self.norm(h))


NAMES = ["embed", "conv", "mlp.0", "mlp.2", "head"]


def _batch(seed: int, b: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 32, (b, 6), generator=g), torch.randn(b, 3, 8, 8, generator=g)


def _kinds(model: nn.Module) -> dict[str, str]:
    mods = dict(model.named_modules())
    return {n: type(mods[n]).__name__ for n in NAMES + ["norm"]}


def _specs(model: nn.Module) -> dict[str, str | None]:
    mods = dict(model.named_modules())
    return {n: mods[n].spec.name if isinstance(mods[n], QuantModule) else None for n in NAMES}


def test_mixed_precision_plan(sqnr):
    model, ref = Small(), Small()
    plan = QuantPlan((Rule("mlp.*", "int8"), Rule("*", "int4-g16-asym")), skip=("*embed*",))
    out = quantize(model, plan, progress=False)
    assert out is model
    assert _specs(model) == {"embed": None, "conv": "int4-g16-asym", "mlp.0": "int8", "mlp.2": "int8",
                             "head": "int4-g16-asym"}
    assert _kinds(model) == {"embed": "Embedding", "conv": "QuantConv2d", "mlp.0": "QuantLinear",
                             "mlp.2": "QuantLinear", "head": "QuantLinear", "norm": "LayerNorm"}
    assert model.embed is not ref.embed and torch.equal(model.embed.weight, ref.embed.weight)
    ids, img = _batch(1)
    with torch.no_grad():
        assert sqnr(ref(ids, img), model(ids, img)) > 15


def test_uniform_int8_is_close_to_float(sqnr):
    model, ref = Small(), Small()
    quantize(model, QuantPlan.uniform("int8", skip=()), progress=False)
    assert isinstance(model.embed, QuantEmbedding) and isinstance(model.conv, QuantConv2d)
    assert isinstance(model.mlp[0], QuantLinear) and isinstance(model.norm, nn.LayerNorm)
    ids, img = _batch(1)
    with torch.no_grad():
        assert sqnr(ref(ids, img), model(ids, img)) > 30


@pytest.mark.parametrize("plan", ["int8", QuantSpec.parse("int8")], ids=["str", "spec"])
def test_a_scheme_instead_of_a_plan(plan):
    model = Small()
    quantize(model, plan, progress=False)
    # a uniform RTN plan with the default skip list: embeddings stay float
    assert _specs(model) == {"embed": None, "conv": "int8", "mlp.0": "int8", "mlp.2": "int8", "head": "int8"}


def test_float_rules_and_skips_leave_modules_untouched():
    model = Small()
    keep = {"conv": model.conv, "head": model.head}
    plan = QuantPlan((Rule("conv", None), Rule("*", "int8")), skip=("head", "*embed*"))
    quantize(model, plan, progress=False)
    assert model.conv is keep["conv"] and model.head is keep["head"]
    assert isinstance(model.mlp[0], QuantLinear)


def _unchanged(model: nn.Module, ref: nn.Module) -> bool:
    return _kinds(model) == _kinds(ref) and all(
        torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_plan_selecting_nothing():
    model, ref = Small(), Small()
    with pytest.raises(InputError, match="selects no module.*Conv2d.*Linear") as e:
        quantize(model, QuantPlan.uniform("int8", skip=("*",)), progress=False)
    assert "skip patterns" in str(e.value)
    with pytest.raises(InputError, match="selects no module"):
        quantize(model, QuantPlan((Rule("decoder.*", "int8"),)), progress=False)
    assert _unchanged(model, ref)


def test_rule_naming_an_unsupported_module():
    model = Small()
    with pytest.raises(InputError, match=r"'norm' names a LayerNorm.*nn\.Linear"):
        quantize(model, QuantPlan((Rule("norm", "int8"), Rule("*", "int8"))), progress=False)
    assert isinstance(model.mlp[0], nn.Linear)


def test_group_larger_than_the_layer_input():
    model, ref = Small(), Small()
    with pytest.raises(InputError) as e:
        quantize(model, QuantPlan((Rule("mlp.*", "int4-g32"), Rule("*", "int8"))), progress=False)
    msg = str(e.value)
    assert "'mlp.0'" in msg and "32" in msg and "16 input elements" in msg and "'-ch'" in msg
    assert _unchanged(model, ref)
    with pytest.raises(InputError, match=r"'conv'.*block \(4, 32\)"):
        quantize(Small(), QuantPlan((Rule("conv", "int8-b4x32"),)), progress=False)


def test_nan_weight_names_the_module_and_changes_nothing():
    model = Small()
    with torch.no_grad():
        model.mlp[2].weight[3, 1] = float("nan")
    ref = copy.deepcopy(model)
    with pytest.raises(InputError, match=r"'mlp\.2'.*\(16, 48\) holds 1 NaN/Inf"):
        quantize(model, "int8", progress=False)
    # no half-quantized model: mlp.0 comes first and was not swapped either
    assert _kinds(model) == _kinds(ref) and all(type(m) is not QuantLinear for m in model.modules())


STATIC = {"spec": "int8-tensor", "dynamic": False}


def test_static_activations_need_data():
    model, ref = Small(), Small()
    plan = QuantPlan.uniform("int8", act=STATIC)
    with pytest.raises(InputError, match="calibration data.*data="):
        quantize(model, plan, progress=False)
    with pytest.raises(InputError, match="empty"):
        quantize(model, plan, data=[], progress=False)
    assert _unchanged(model, ref)


def test_static_activations_with_data(sqnr):
    model, ref = Small(), Small()
    data = [_batch(s) for s in range(3)]
    quantize(model, QuantPlan.uniform("int8", act=STATIC), data=data, progress=False)
    for name in ["conv", "mlp.0", "mlp.2", "head"]:
        m = model.get_submodule(name)
        assert m.act is not None and not m.act.dynamic
        assert torch.isfinite(m.act_lo).all() and torch.isfinite(m.act_hi).all()
        assert m.act_lo.shape == (1, 1) and float(m.act_lo) < 0 < float(m.act_hi)
    # mlp.2 sees GELU outputs, bounded below by about -0.17
    assert float(model.mlp[2].act_lo) > -0.2
    ids, img = _batch(0)
    with torch.no_grad():
        assert sqnr(ref(ids, img), model(ids, img)) > 25


def test_dynamic_activations_need_no_data(sqnr):
    model, ref = Small(), Small()
    quantize(model, QuantPlan.uniform("int8", act="int8-token", skip=("*embed*", "conv")), progress=False)
    assert model.mlp[0].act == ActivationQuant("int8-token")
    ids, img = _batch(1)
    with torch.no_grad():
        assert sqnr(ref(ids, img), model(ids, img)) > 25


def test_activation_weighted_rtn_needs_data_and_linears():
    weighted = RTN(clip_search=True, weighted=True)
    model = Small()
    with pytest.raises(InputError, match="calibration data"):
        quantize(model, QuantPlan((Rule("mlp.*", "int4-g16", weighted),)), progress=False)
    quantize(model, QuantPlan((Rule("mlp.*", "int4-g16", weighted),)), data=[_batch(0), _batch(1)], progress=False)
    assert isinstance(model.mlp[0], QuantLinear) and isinstance(model.conv, nn.Conv2d)


def test_rule_matching_nothing_is_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="lowbit.quantizer"):
        quantize(Small(), QuantPlan((Rule("decoder.*", "int4"), Rule("*", "int8"))), progress=False)
    assert "decoder.*" in caplog.text


def test_any_algorithm_object_runs_without_registration():
    """quantize() knows algorithms only through the Algorithm protocol: a user's own config object (here
    "round every weight to its tile's midpoint range after halving the input", needing abs_mean) runs, gets
    the statistics it asks for, and its input scale is stored in the layer."""
    from dataclasses import dataclass
    from typing import ClassVar

    from lowbit.algorithms import Algorithm, WeightResult
    from lowbit.formats import quantize as quantize_tensor

    seen = {}

    @dataclass(frozen=True)
    class Halve:
        name: ClassVar[str] = "halve"
        stats_needed: ClassVar[tuple[str, ...]] = ("abs_mean",)

        def run(self, W, stats, spec, ranges=None):
            seen["abs_mean"] = stats["abs_mean"]
            return WeightResult(quantize_tensor(W * 2, spec), torch.full((W.shape[1],), 0.5))

        def to_dict(self):
            return {"name": self.name}

    assert isinstance(Halve(), Algorithm)
    model = nn.Sequential(nn.Linear(16, 8))
    x = torch.randn(32, 16)
    plan = QuantPlan((Rule("*", "int8", method=Halve()),))
    assert plan.needs_data
    lowbit.quantize(model, plan, [x], progress=False)
    assert torch.allclose(seen["abs_mean"], x.abs().mean(0), rtol=1e-5)
    assert torch.equal(model[0].input_scale, torch.full((16,), 0.5))

"""Quantized inputs of modules without weights (softmax, GELU): plan entries, calibration, hooks, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import CorruptFileError, InputError
from lowbit.formats import fake_quantize
from lowbit.io import read_manifest
from lowbit.nn.input_quant import INPUTS_ATTR, InputQuant, attach_input_quant, detach_input_quant
from lowbit.plan import QuantPlan, Rule
from lowbit.spec import ActivationQuant, QuantSpec


class _Tiny(nn.Module):
    """Attention scores through an ``nn.Softmax``, then a GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k = nn.Linear(8, 8), nn.Linear(8, 8)
        self.softmax = nn.Softmax(dim=-1)
        self.mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, 8) -> (N, T, 4)
        att = self.softmax(self.q(x) @ self.k(x).transpose(-2, -1))  # (N, T, T)
        return self.mlp(att @ x)


STATIC = {"spec": "int4-tensor-asym", "dynamic": False}  # 4 bits: a large, visible effect


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return _Tiny().eval()


def _data() -> list[torch.Tensor]:
    return [torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(i)) * 2 for i in range(3)]


def _plan(*inputs: dict) -> QuantPlan:
    return QuantPlan((Rule("*", "int8"),), skip=(), inputs=inputs)


def test_the_hooks_quantize_each_input_with_the_range_calibrated_on_the_quantized_model():
    model = lowbit.quantize(_tiny(), _plan({"pattern": "softmax", "act": STATIC},
                                           {"pattern": "type:GELU", "act": STATIC}), _data(), progress=False)
    record = model.__dict__[INPUTS_ATTR]
    assert sorted(record) == ["mlp.1", "softmax"]
    seen = {"softmax": [], "mlp.1": []}  # the raw inputs, before the hooks quantize them
    hooks = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0]), prepend=True)
             for n in seen]
    detach_input_quant(model)  # ranges come from one pass of the quantized model without these hooks
    with torch.no_grad():
        for b in _data():
            model(b)
    for name in seen:
        calib = torch.cat([t.reshape(-1) for t in seen[name]])
        assert (record[name]["lo"], record[name]["hi"]) == (float(calib.min()), float(calib.max()))
        seen[name].clear()
    attach_input_quant(model, record)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(9)) * 2
    with torch.no_grad():
        y = model(x)
    for h in hooks:
        h.remove()
    spec = QuantSpec.parse("int4-tensor-asym")

    def fq(t: torch.Tensor, name: str) -> torch.Tensor:
        lo, hi = torch.tensor([[record[name]["lo"]]]), torch.tensor([[record[name]["hi"]]])
        return fake_quantize(t.reshape(-1, t.shape[-1]), spec, lo, hi).reshape(t.shape)

    raw = seen["softmax"][0]
    att = torch.softmax(fq(raw, "softmax"), -1)  # the module computed on the fake-quantized input
    assert not torch.allclose(att, torch.softmax(raw, -1), atol=1e-3)  # 4 bits changed the scores
    with torch.no_grad():
        g = seen["mlp.1"][0]
        assert torch.allclose(model.mlp[0](att @ x), g, atol=1e-5)
        assert torch.allclose(y, model.mlp[2](nn.functional.gelu(fq(g, "mlp.1"))), atol=1e-5)
    detach_input_quant(model)
    with torch.no_grad():
        assert not torch.allclose(model(x), y, atol=1e-3)  # without the hooks: float softmax and GELU inputs


def test_dynamic_inputs_need_no_data():
    model = lowbit.quantize(_tiny(), _plan({"pattern": "softmax", "act": {"spec": "int4-token", "dynamic": True}}),
                            progress=False)
    assert model.__dict__[INPUTS_ATTR]["softmax"]["lo"] is None


def test_a_plan_with_inputs_round_trips_and_needs_data_when_static():
    plan = _plan({"pattern": "*.softmax", "act": STATIC})
    again = QuantPlan.from_yaml(plan.to_yaml())
    assert again == plan and again.inputs == (InputQuant("*.softmax", ActivationQuant.from_dict(STATIC)),)
    assert plan.needs_data and not _plan({"pattern": "x", "act": {"spec": "int8-token"}}).needs_data


@pytest.mark.parametrize("inputs, match", [
    ([{"pattern": "*.attn", "act": STATIC}], "matches no module"),
    ([{"pattern": "q", "act": STATIC}], "a layer with weights"),
])
def test_entries_that_name_nothing_or_a_layer_are_refused_before_anything_changes(inputs, match):
    model = _tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=match):
        lowbit.quantize(model, _plan(*inputs), _data(), progress=False)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, lowbit.nn.QuantLinear) for m in model.modules())


def test_static_inputs_without_data_are_refused_and_bad_entries_named():
    with pytest.raises(InputError, match="pass calibration data"):
        lowbit.quantize(_tiny(), _plan({"pattern": "softmax", "act": STATIC}), progress=False)
    with pytest.raises(InputError, match=r"inputs\[0\]: expected a mapping with exactly 'pattern' and 'act'"):
        QuantPlan.from_dict({"rules": [{"pattern": "*", "weight": "int8"}], "inputs": [{"pattern": "softmax"}]})
    with pytest.raises(InputError, match=r"inputs\[0\]"):
        QuantPlan.from_dict({"rules": [{"pattern": "*", "weight": "int8"}],
                             "inputs": [{"pattern": "softmax", "act": {"spec": "int8-token", "dynamic": False}}]})


def test_save_and_load_keep_the_quantized_inputs(tmp_path):
    model = lowbit.quantize(_tiny(), _plan({"pattern": "softmax", "act": STATIC}), _data(), progress=False)
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        y = model(x)
    path = lowbit.save(model, tmp_path / "m")
    assert read_manifest(path)["extra"]["inputs"] == model.__dict__[INPUTS_ATTR]
    loaded = lowbit.load(path, model=_Tiny())
    with torch.no_grad():
        assert torch.equal(loaded(x), y)


def test_a_damaged_inputs_record_is_refused_before_the_model_is_touched(tmp_path):
    model = lowbit.quantize(_tiny(), _plan({"pattern": "softmax", "act": STATIC}), _data(), progress=False)
    path = lowbit.save(model, tmp_path / "m")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["extra"]["inputs"]["softmax"]["hi"] = "six"
    (path / "manifest.json").write_text(json.dumps(manifest))
    skeleton = _Tiny()
    with pytest.raises(CorruptFileError, match="extra.inputs"):
        lowbit.load(path, model=skeleton)
    assert not any(isinstance(m, lowbit.nn.QuantLinear) for m in skeleton.modules())


def test_the_vit_recipe_finds_every_softmax_and_gelu_of_the_bundled_vit():
    from pathlib import Path

    from lowbit.models.fmnist import skeleton
    from lowbit.nn.input_quant import select_inputs

    plan = QuantPlan.load(Path(__file__).resolve().parents[2] / "recipes/vit-w8a8-static-softmax-gelu.yaml")
    vit = skeleton("fmnist-vit")
    points = select_inputs(vit, plan.inputs)
    assert sorted(points) == sorted([f"blocks.{i}.attn.softmax" for i in range(4)] +
                                    [f"blocks.{i}.mlp.1" for i in range(4)])
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():  # the softmax module computes what torch.softmax did
        scores = torch.randn(2, 4, 17, 17)
        assert torch.equal(vit.blocks[0].attn.softmax(scores), torch.softmax(scores, dim=-1))
        assert vit(x).shape == (2, 10)

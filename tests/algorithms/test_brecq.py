"""Block reconstruction: units from the module tree, lower block error than before, codes on the grid, the
plan's reconstruct key through quantize(), save and load."""

from __future__ import annotations

import copy

import pytest
import torch
import yaml

from lowbit.algorithms.brecq import Reconstruction, reconstruct, reconstruction_units
from lowbit.errors import InputError
from lowbit.io import load, save
from lowbit.models.fmnist import skeleton
from lowbit.nn.base import QuantModule
from lowbit.nn.state import CALIBRATION_ATTR
from lowbit.plan import QuantPlan, Rule
from lowbit.quantizer import quantize
from lowbit.spec import ActivationQuant
from lowbit.transforms import apply_transforms


def _data(n=96, seed=0):
    return torch.randn(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _plan(reconstruct=None, weight="int3", act="int4-tensor"):
    a = ActivationQuant(act, dynamic=False, observer="minmax")
    return QuantPlan((Rule("*", weight, "rtn", a),), (), ("fold_batchnorm",), None, reconstruct)


def test_units_are_the_residual_blocks_and_the_layers_outside_them():
    model = skeleton("fmnist-resnet")
    quantize(model, _plan(), _data(16), progress=False)
    assert reconstruction_units(model) == ["blocks.0", "blocks.1", "blocks.2", "stem.0", "fc"]
    vit = skeleton("fmnist-vit")
    quantize(vit, QuantPlan.uniform("int8", skip=()), progress=False)
    assert reconstruction_units(vit)[:4] == ["blocks.0", "blocks.1", "blocks.2", "blocks.3"]
    assert set(reconstruction_units(vit)[4:]) == {"patch_embed", "head"}


def test_reconstruction_lowers_each_units_error_and_keeps_the_grid():
    data = _data()
    model = skeleton("fmnist-resnet")
    reference = copy.deepcopy(model)
    apply_transforms(reference, ["fold_batchnorm"])
    quantize(model, _plan(), data, progress=False)
    before = {n: m.quantized_weight() for n, m in model.named_modules() if isinstance(m, QuantModule)}
    ratios = reconstruct(model, reference, data, Reconstruction(iters=40, batch=16), progress=False)
    assert set(ratios) == {"blocks.0", "blocks.1", "blocks.2", "stem.0", "fc"}
    assert all(0 < r <= 1 for r in ratios.values()) and min(ratios.values()) < 0.95
    changed = 0
    for n, m in model.named_modules():
        if isinstance(m, QuantModule):
            q, q0 = m.quantized_weight(), before[n]
            assert torch.equal(q.scale, q0.scale)
            step = q.codes.int() - q0.codes.int()
            assert step.abs().max() <= 1  # up or down by one level from round to nearest
            changed += int(step.ne(0).sum())
    assert changed > 0


def test_the_plan_key_runs_it_inside_quantize_and_the_model_saves_and_loads(tmp_path):
    data = _data(48)
    plan = _plan(Reconstruction(iters=20, batch=16, drop=0.0))
    model = skeleton("fmnist-resnet")
    quantize(model, plan, data, progress=False)
    assert set(model.__dict__[CALIBRATION_ATTR]["reconstruct"]["error_ratio"]) >= {"blocks.0", "fc"}
    out = model(data[:4])
    loaded = load(save(model, tmp_path / "q", plan=plan), model=skeleton("fmnist-resnet"))
    assert torch.equal(loaded(data[:4]), out)


def test_settings_round_trip_and_bad_ones_are_refused():
    plan = _plan(Reconstruction(iters=7, drop=0.25))
    again = QuantPlan.from_dict(yaml.safe_load(yaml.safe_dump(plan.to_dict())))
    assert again.reconstruct == plan.reconstruct and again.needs_data
    assert QuantPlan.from_dict({**plan.to_dict(), "reconstruct": True}).reconstruct == Reconstruction()
    for bad in ({"iters": 0}, {"drop": 1.0}, {"lr": 0}, {"beta": [1]}):
        with pytest.raises(InputError, match="reconstruct"):
            Reconstruction(**bad)
    with pytest.raises(InputError, match="unknown setting"):
        QuantPlan.from_dict({**plan.to_dict(), "reconstruct": {"steps": 3}})
    with pytest.raises(InputError, match="pass data="):
        quantize(skeleton("fmnist-resnet"), QuantPlan((Rule("*", "int4"),), (), (), None, Reconstruction()),
                 progress=False)


def test_a_vit_calibrated_block_by_block_takes_adaround_and_reconstruction(tmp_path):
    # block-by-block calibration builds the layers in inference mode: learning must still work on them
    data = _data(32)
    model = skeleton("fmnist-vit")
    ref = model(data[:4])
    a8 = ActivationQuant("int8-tensor", dynamic=False)
    plan = QuantPlan((Rule("*", "int4", {"name": "adaround", "iters": 20}, a8),), (), (), None,
                     Reconstruction(iters=10, batch=8))
    quantize(model, plan, data, progress=False)
    ratios = model.__dict__[CALIBRATION_ATTR]["reconstruct"]["error_ratio"]
    assert {"blocks.0", "blocks.3", "head"} <= set(ratios) and all(r <= 1 for r in ratios.values())
    out = model(data[:4])
    assert (out - ref).abs().max() < ref.abs().max()
    loaded = load(save(model, tmp_path / "v", plan=plan), model=skeleton("fmnist-vit"))
    assert torch.equal(loaded(data[:4]), out)


def test_a_decoder_lm_reconstructs_its_layers_from_several_batches():
    """A Llama decoder layer is called with ``position_embeddings`` (a tuple of tables with one row for the whole
    batch) besides the hidden states: the batches merge, and the tables are shared rather than cut by rows."""
    from lowbit.algorithms.brecq import _merged, _unit_inputs
    from lowbit.models import load_model

    model = load_model("tiny-llama").model
    data = [torch.randint(3, 250, (2, 16), generator=torch.Generator().manual_seed(i)) for i in range(3)]
    (args, kwargs), = _merged(_unit_inputs(model, "model.layers.0", data))
    assert args[0].shape == (6, 16, 64)
    assert all(t.shape[0] == 1 for t in kwargs["position_embeddings"])
    plan = QuantPlan.uniform("int3-g16-asym")
    plan = QuantPlan(plan.rules, plan.skip, (), None, {"iters": 40, "batch": 2})
    quantize(model, plan, data, progress=False)
    ratios = model.__dict__[CALIBRATION_ATTR]["reconstruct"]["error_ratio"]
    assert set(ratios) == {"model.layers.0", "model.layers.1"}
    assert all(r <= 1.0 for r in ratios.values()) and min(ratios.values()) < 0.95, ratios

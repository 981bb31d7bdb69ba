"""SmoothQuant: an exact float rewrite whose per-block alpha search lowers the error of quantized activations,
recorded in the plan, undone on failure, refused without data or next to a rotation."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.io import load, save
from lowbit.models import tiny
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize
from lowbit.transforms import apply_transforms
from lowbit.transforms.smooth import smoothing_pairs

from tests.transforms.test_fuse_norms import with_random_norms

ARCHS = {"llama": tiny.tiny_llama, "gemma3": tiny.tiny_gemma3, "gpt2": tiny.tiny_gpt2, "opt": tiny.tiny_opt}
# fp32 rounding of the rescaled gains and weights: measured 1.5e-6 (llama), 1.1e-5 (gemma3), 3.1e-7 (gpt2),
# 2.8e-6 (opt) relative to the largest logit
RTOL = 5e-5


def with_outliers(model: nn.Module) -> nn.Module:
    """Random norm gains, three channels of each 30x larger: the activation outliers of real LLMs."""
    with_random_norms(model)
    with torch.no_grad():
        for name, m in model.named_modules():
            if "norm" in name.rsplit(".", 1)[-1] and getattr(m, "weight", None) is not None:
                m.weight[:3] *= 30
    return model


def _ids(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, 32), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


def _plan(act: str = "int4-token", transforms=("smoothquant",)) -> QuantPlan:
    return QuantPlan.from_dict({"rules": [{"pattern": "*", "weight": "int8", "act": act}],
                                "transforms": list(transforms)})


@pytest.mark.parametrize("arch", ARCHS)
def test_smoothing_keeps_the_float_logits_and_lowers_the_quantized_error(arch, caplog):
    model = with_outliers(ARCHS[arch]())
    ids = _ids()
    ref = _logits(model, ids)
    smoothed = copy.deepcopy(model)
    with caplog.at_level(logging.INFO, logger="lowbit.transforms.smooth"):
        originals = apply_transforms(smoothed, ["smoothquant"], data=ids, plan=_plan())
    assert "alpha per block" in caplog.text
    assert (_logits(smoothed, ids) - ref).abs().max() < RTOL * ref.abs().max()
    errors = {}
    for name, transforms in (("plain", ()), ("smooth", ("smoothquant",))):
        m = copy.deepcopy(model)
        quantize(m, _plan(transforms=transforms), ids, progress=False)
        errors[name] = float((_logits(m, ids) - ref).norm() / ref.norm())
    assert errors["smooth"] < errors["plain"], errors  # measured: llama 0.63 -> 0.38, opt 0.32 -> 0.16
    originals.restore()
    assert all(torch.equal(a, b) for a, b in zip(smoothed.state_dict().values(), model.state_dict().values()))


def test_the_table_gives_norm_pairs_and_the_mlp_pair_where_the_mlp_is_linear_in_up():
    pairs = {p.producer: p.consumers for p in smoothing_pairs(tiny.tiny_llama())}
    assert pairs["model.layers.0.input_layernorm"] == tuple(f"model.layers.0.self_attn.{x}_proj" for x in "qkv")
    assert pairs["model.layers.1.mlp.up_proj"] == ("model.layers.1.mlp.down_proj",)
    assert "model.norm" not in pairs  # the head is not smoothed
    opt = {p.producer for p in smoothing_pairs(tiny.tiny_opt())}
    assert not any(p.endswith("fc1") for p in opt)  # OPT's MLP: no linear pair in its table


def test_only_pairs_whose_consumers_quantize_activations_are_smoothed():
    model = with_outliers(tiny.tiny_llama())
    before = copy.deepcopy(model.state_dict())
    plan = QuantPlan.from_dict({"rules": [{"pattern": "*.down_proj", "weight": "int8", "act": "int4-token"},
                                          {"pattern": "*", "weight": "int8"}], "transforms": ["smoothquant"]})
    apply_transforms(model, ["smoothquant"], data=_ids(), plan=plan)
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(".mlp.up_proj." in k or ".mlp.down_proj." in k for k in changed), changed


def test_smoothquant_needs_data_and_does_not_combine_with_a_rotation():
    model = tiny.tiny_llama()
    assert _plan().needs_data
    with pytest.raises(InputError, match="smoothquant transform needs calibration data"):
        quantize(model, _plan(), progress=False)
    with pytest.raises(InputError, match="rotate after smoothquant would fuse the scaled norm gains back"):
        _plan(transforms=("smoothquant", "rotate"))
    with pytest.raises(InputError, match="fuse_norms after awq_scales"):
        _plan(transforms=("awq_scales", "fuse_norms"))
    with pytest.raises(InputError, match="pick one"):
        _plan(transforms=("awq_scales", "smoothquant"))
    assert _plan(transforms=("rotate", "smoothquant")).transforms == ("rotate", "smoothquant")


def test_a_smoothed_model_saves_and_loads_the_same(tmp_path):
    model = with_outliers(tiny.tiny_opt())
    ids = _ids(8)
    quantize(model, _plan("int8-token"), ids, progress=False)
    out = _logits(model, ids)
    loaded = load(save(model, tmp_path / "sq", plan=_plan("int8-token")), model=tiny.tiny_opt(seed=5))
    assert torch.equal(_logits(loaded, ids), out)


def test_a_failed_quantization_puts_back_the_unsmoothed_model(fail_in_block_1):
    model = with_outliers(tiny.tiny_llama())
    before = copy.deepcopy(model.state_dict())
    plan = QuantPlan.from_dict({"rules": [{"pattern": "*", "weight": "int4-g32-asym", "method": "gptq",
                                           "act": "int8-token"}], "transforms": ["smoothquant"]})
    with pytest.raises(InputError, match="boom"):
        quantize(model, plan, _ids(8, 0), progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_awq_scales_fold_into_norms_and_lower_the_weight_only_error(arch, tmp_path):
    model = with_outliers(ARCHS[arch]())
    ids = _ids()
    ref = _logits(model, ids)
    plan = QuantPlan.from_dict({"rules": [{"pattern": "*", "weight": "int3-g32-asym"}], "transforms": ["awq_scales"]})
    scaled = copy.deepcopy(model)
    apply_transforms(scaled, ["awq_scales"], data=ids, plan=plan)
    assert (_logits(scaled, ids) - ref).abs().max() < RTOL * ref.abs().max()
    errors = {}
    for name, p in (("rtn", QuantPlan(plan.rules)), ("awq_scales", plan)):
        m = copy.deepcopy(model)
        quantize(m, p, ids, progress=False)
        errors[name] = float((_logits(m, ids) - ref).norm() / ref.norm())
        assert not any(getattr(x, "input_scale", None) is not None for x in m.modules())  # folded, none stored
    assert errors["awq_scales"] < errors["rtn"], errors


def test_a_llama_with_awq_scales_exports_to_gguf(tmp_path):
    pytest.importorskip("gguf")
    import lowbit
    from lowbit.export import export_gguf

    lm = lowbit.load_model("tiny-llama")
    with_outliers(lm.model)
    ids = _ids(8)
    plan = QuantPlan.from_dict({"rules": [{"pattern": "*", "weight": "int4-g32", "method": "gptq"}],
                                "transforms": ["awq_scales"]})
    quantize(lm.model, plan, ids, progress=False)
    assert export_gguf(lm.model, lm.source, tmp_path / "m.gguf").stat().st_size > 0

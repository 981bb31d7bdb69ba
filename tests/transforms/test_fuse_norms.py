"""fuse_norms: the float model keeps its logits, its norms become identity-gain, and quantize() applies it as a
pre-pass that survives save/load and is undone exactly when quantization fails."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.io import load, save
from lowbit.models import tiny
from lowbit.models.arch import norm_groups
from lowbit.nn import QuantLinear
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize
from lowbit.transforms import apply_transforms, fuse_norms
from lowbit.transforms.fuse_norms import fuse_affine

ARCHS = {"llama": tiny.tiny_llama, "gpt2": tiny.tiny_gpt2, "opt": tiny.tiny_opt, "gemma3": tiny.tiny_gemma3}
TIED = {"gpt2", "opt", "gemma3"}  # lm_head shares the embedding: the final norm keeps its gain
# fp32 rounding: measured max |diff| / max |logit| of 2.9e-7 (llama), 3.5e-7 (gpt2), 3.2e-7 (opt), 6.8e-7 (gemma3)
RTOL = 1e-5


def with_random_norms(model: nn.Module, seed: int = 1) -> nn.Module:
    """Give every norm a gain in [0.25, 1.75] (Gemma-3: weight in [-0.75, 0.75], gain 1 + weight) and, where it
    has one, a bias ~ N(0, 0.5): the tiny models' norms start at exactly 1 and 0, which would test nothing."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if "Norm" not in type(m).__name__:
                continue
            offset = 1.0 if type(m).__name__ == "Gemma3RMSNorm" else 0.0
            if getattr(m, "weight", None) is not None:
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) * 1.5 + 0.25 - offset)
            if getattr(m, "bias", None) is not None:
                m.bias.copy_(torch.randn(m.bias.shape, generator=g) * 0.5)
    return model


def _ids(n: int, seed: int, length: int = 40) -> torch.Tensor:
    return torch.randint(3, 256, (n, length), generator=torch.Generator().manual_seed(seed))


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(ids).logits


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_are_unchanged_and_norms_become_identity(arch):
    model = with_random_norms(ARCHS[arch]())
    ids = _ids(2, 0)
    ref = _logits(model, ids)
    groups = norm_groups(model)
    embed = model.get_input_embeddings().weight.detach().clone()
    assert fuse_norms(model) is model
    out = _logits(model, ids)
    assert (out - ref).abs().max() < RTOL * ref.abs().max()
    unit = 0.0 if arch == "gemma3" else 1.0
    for g in groups:
        norm = model.get_submodule(g.norm)
        tied_final = arch in TIED and g.linears == ("lm_head",)
        assert torch.all(norm.weight == unit) != tied_final, g.norm  # the tied head's norm keeps its gain
        if getattr(norm, "bias", None) is not None and not tied_final:
            assert torch.all(norm.bias == 0), g.norm
    assert torch.equal(model.get_input_embeddings().weight, embed)  # a tied head is never changed


def test_fuse_affine_on_a_small_matrix(gen):
    W, c = torch.randn(6, 8, generator=gen), torch.randn(6, generator=gen)
    g, b, x = torch.rand(8, generator=gen) + 0.5, torch.randn(8, generator=gen), torch.randn(5, 8, generator=gen)
    W2, c2 = fuse_affine(W, c, g, b)
    assert torch.allclose(x @ W2.T + c2, (x * g + b) @ W.T + c, atol=1e-5)
    W3, c3 = fuse_affine(W, None, g, b)  # no bias before: one is made
    assert torch.allclose(x @ W3.T + c3, (x * g + b) @ W.T, atol=1e-5)
    assert fuse_affine(W, None, g, None)[1] is None and W2.dtype == W.dtype


def test_a_linear_without_bias_gets_one_and_undo_removes_it():
    model = with_random_norms(tiny.tiny_opt())
    fc1 = model.model.decoder.layers[0].fc1
    fc1.bias = None
    ref = _logits(model, _ids(1, 0))
    originals = apply_transforms(model, ["fuse_norms"])
    assert fc1.bias is not None
    assert (_logits(model, _ids(1, 0)) - ref).abs().max() < RTOL * ref.abs().max()
    originals.restore()
    assert fc1.bias is None


@pytest.mark.parametrize("arch", ["llama", "opt", "gemma3"])
def test_quantized_with_fuse_norms_saves_and_loads_the_same(tmp_path, arch):
    model = with_random_norms(ARCHS[arch]())
    ids = _ids(2, 1)
    ref = _logits(model, ids)
    plan = QuantPlan.uniform("int8")
    plan = QuantPlan(plan.rules, plan.skip, transforms=("fuse_norms",))
    quantize(model, plan, progress=False)
    out = _logits(model, ids)
    assert (out - ref).abs().max() < 0.1 * ref.abs().max()  # int8: close to the float model
    loaded = load(save(model, tmp_path / "art", plan=plan), model=ARCHS[arch](seed=123))
    assert torch.equal(_logits(loaded, ids), out)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_a_failed_quantization_puts_the_original_float_weights_back(arch, fail_in_block_1):
    model = with_random_norms(ARCHS[arch]())
    before = copy.deepcopy(model.state_dict())
    plan = QuantPlan.uniform("int4-g32-asym", method="gptq")
    with pytest.raises(InputError, match="boom"):
        quantize(model, QuantPlan(plan.rules, plan.skip, ("fuse_norms",)), _ids(8, 0, 32), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_a_model_that_does_not_fit_is_refused_and_left_unchanged():
    model = with_random_norms(tiny.tiny_llama())
    model.model.layers[1].post_attention_layernorm = nn.Identity()
    before = copy.deepcopy(model.state_dict())
    plan = QuantPlan(QuantPlan.uniform("int8").rules, transforms=("fuse_norms",))
    with pytest.raises(InputError, match=r"'model\.layers\.1\.post_attention_layernorm' is a Identity"):
        quantize(model, plan, progress=False)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_weight_shared_between_blocks_is_refused():
    model = tiny.tiny_llama()
    layers = model.model.layers
    layers[1].self_attn.q_proj.weight = layers[0].self_attn.q_proj.weight
    with pytest.raises(InputError, match=r"'model\.layers\.0\.self_attn\.q_proj'.*shared with "
                                         r"model\.layers\.1\.self_attn\.q_proj.*untie"):
        fuse_norms(model)


def test_unknown_family_lists_the_known_ones():
    with pytest.raises(InputError, match="not in lowbit's architecture table.*llama.*gemma3.*gpt2.*opt"):
        fuse_norms(tiny.tiny_cnn())


def test_plan_transforms_round_trip_through_yaml():
    plan = QuantPlan(QuantPlan.uniform("int4-g32-asym").rules, transforms=("fuse_norms",))
    text = plan.to_yaml()
    assert "transforms:\n- fuse_norms" in text
    again = QuantPlan.from_yaml(text)
    assert again == plan and again.transforms == ("fuse_norms",)
    assert "transforms" not in QuantPlan.uniform("int8").to_dict()  # plans without transforms keep their dicts
    recipe = "transforms: [fuse_norms]\nrules:\n  - {pattern: '*', weight: int8}\n"
    assert QuantPlan.from_yaml(recipe).transforms == ("fuse_norms",)


@pytest.mark.parametrize("recipe, message", [
    ("transforms: [spin]\nrules: [{pattern: '*', weight: int8}]", r"unknown transform 'spin'; known: fuse_norms"),
    ("transforms: fuse_norms\nrules: [{pattern: '*', weight: int8}]", r"'transforms' must be a list"),
])
def test_bad_transforms_in_a_recipe(recipe, message):
    with pytest.raises(InputError, match=message):
        QuantPlan.from_yaml(recipe)
    with pytest.raises(InputError, match="unknown transform"):
        QuantPlan(QuantPlan.uniform("int8").rules, transforms=("spin",))

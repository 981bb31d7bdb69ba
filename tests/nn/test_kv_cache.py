"""KV-cache quantization: the cached keys and values are rounded as the spec says, every call (with or without a
cache of its own, in generate) goes through it, and the plan records it so that load quantizes the cache again."""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

import lowbit
from lowbit.errors import InputError
from lowbit.formats import fake_quantize
from lowbit.hadamard import hadamard_transform
from lowbit.nn.kv_cache import attach_kv_quant, detach_kv_quant, kv_quant_of, quantize_kv
from lowbit.plan import QuantPlan
from lowbit.spec import KVCacheQuant, parse_spec


def _ids(seed: int = 0, length: int = 24) -> torch.Tensor:
    return torch.randint(3, 256, (2, length), generator=torch.Generator().manual_seed(seed))


def _logits(model, ids, **kw):
    with torch.inference_mode():
        return model(ids, **kw).logits


def test_quantize_kv_rounds_each_head_of_each_token(gen):
    x = torch.randn(2, 4, 5, 16, generator=gen)  # (batch, heads, tokens, head_dim)
    kv = KVCacheQuant("int4-token-asym")
    assert torch.equal(quantize_kv(x, kv), fake_quantize(x.reshape(-1, 16), parse_spec("int4-token-asym")).view_as(x))
    rot = quantize_kv(x, KVCacheQuant("int4-g8-asym", rotate=True))
    by_hand = hadamard_transform(fake_quantize(hadamard_transform(x.reshape(-1, 16)), parse_spec("int4-g8-asym")),
                                 transpose=True).view_as(x)
    assert torch.allclose(rot, by_hand, atol=1e-6)
    assert len(torch.unique(quantize_kv(x, KVCacheQuant("int2-token-asym"))[0, 0, 0])) <= 4  # 2 bits: 4 levels
    with pytest.raises(InputError, match="NaN"):
        quantize_kv(torch.full((1, 1, 1, 16), float("nan")), kv)


@pytest.mark.parametrize("spec, most", [("int8-token", 0.02), ("int4-token-asym", 0.3), ("fp8-e4m3-token", 0.1)])
def test_every_call_reads_the_quantized_cache_and_detach_restores_the_float_model(spec, most):
    lm = lowbit.load_model("tiny-llama")
    ids = _ids()
    ref = _logits(lm.model, ids, use_cache=False)
    attach_kv_quant(lm.model, KVCacheQuant(spec))
    with torch.inference_mode():
        out = lm.model(ids, use_cache=False)
    assert out.past_key_values is None  # no cache asked for, none returned
    moved = float((out.logits - ref).abs().max() / ref.abs().max())
    assert 0 < moved < most
    cache = DynamicCache(config=lm.model.config)  # a cache passed in (as generate does) is quantized too
    with torch.inference_mode():
        again = lm.model(ids, past_key_values=cache, use_cache=True).logits
    assert torch.equal(again, out.logits)
    keys = cache.layers[0].keys  # (batch, kv heads, tokens, head_dim): each row holds at most 2^bits values
    levels = max(len(torch.unique(row)) for row in keys.reshape(-1, keys.shape[-1]))
    assert levels <= {"int8-token": 256, "int4-token-asym": 16, "fp8-e4m3-token": 256}[spec]
    assert spec != "int4-token-asym" or levels < keys.shape[-1]  # 16 channels on at most 16 levels: some repeat
    detach_kv_quant(lm.model)
    assert kv_quant_of(lm.model) is None and torch.equal(_logits(lm.model, ids, use_cache=False), ref)


def test_generate_uses_the_quantized_cache():
    lm = lowbit.load_model("tiny-llama")
    ids = _ids(1, 6)[:1]
    attach_kv_quant(lm.model, KVCacheQuant("int2-token-asym"))
    calls = []
    real = quantize_kv.__globals__["quantize_kv"]
    quantize_kv.__globals__["quantize_kv"] = lambda x, kv: calls.append(x.shape) or real(x, kv)
    try:
        lm.model.generate(ids, max_new_tokens=3, do_sample=False)
    finally:
        quantize_kv.__globals__["quantize_kv"] = real
    assert calls and calls[-1][2] == 1  # the last step cached one new token's keys and values


def test_a_plan_with_kv_saves_and_loads_with_its_cache_quantized(tmp_path):
    lm = lowbit.load_model("tiny-llama")
    ids = _ids(2)
    plan = QuantPlan.from_yaml("rules: [{pattern: '*', weight: int8}]\nkv: {spec: int4-token-asym, rotate: true}\n")
    assert plan.kv == KVCacheQuant("int4-token-asym", True) and QuantPlan.from_yaml(plan.to_yaml()) == plan
    lowbit.quantize(lm.model, plan, progress=False)
    out = _logits(lm.model, ids, use_cache=False)
    loaded = lowbit.load(lowbit.save(lm.model, tmp_path / "kv", source=lm.source, plan=plan))
    assert kv_quant_of(loaded) == plan.kv
    assert torch.equal(_logits(loaded, ids, use_cache=False), out)


def test_a_kv_only_plan_quantizes_no_layer():
    lm = lowbit.load_model("tiny-llama")
    plan = QuantPlan.from_yaml("rules: [{pattern: '*', weight: null}]\nkv: int8-token\n")
    lowbit.quantize(lm.model, plan, progress=False)
    assert kv_quant_of(lm.model) == KVCacheQuant("int8-token")
    assert not any(isinstance(m, lowbit.nn.QuantLinear) for m in lm.model.modules())


@pytest.mark.parametrize("kv, message", [
    ({"spec": "int4-ch"}, r"per token and head"),
    ({"spec": "int8-token", "bits": 4}, r"unknown kv-cache field\(s\) \['bits'\]"),
    ({"rotate": True}, r"need a 'spec'"),
    ({"spec": "int8-token", "rotate": "yes"}, r"'rotate' must be true or false"),
])
def test_bad_kv_settings_in_a_recipe(kv, message):
    with pytest.raises(InputError, match="recipe: kv: .*" + message):
        QuantPlan.from_dict({"rules": [{"pattern": "*", "weight": "int8"}], "kv": kv})


def test_kv_groups_must_tile_the_head_width_and_quantize_refuses_before_changing_anything():
    lm = lowbit.load_model("tiny-llama")  # head_dim 16
    with pytest.raises(InputError, match="groups of 24 do not tile the head width 16"):
        attach_kv_quant(lm.model, KVCacheQuant("int4-g24"))
    plan = QuantPlan.from_yaml("rules: [{pattern: '*', weight: int8}]\nkv: int4-g24\n")
    with pytest.raises(InputError, match="groups of 24"):
        lowbit.quantize(lm.model, plan, progress=False)
    assert not any(isinstance(m, lowbit.nn.QuantLinear) for m in lm.model.modules())
    with pytest.raises(InputError, match="needs a Hugging Face model"):
        lowbit.quantize(torch.nn.Sequential(torch.nn.Linear(8, 8)), QuantPlan.from_yaml(
            "rules: [{pattern: '*', weight: int8}]\nkv: int8-token\n"), progress=False)

"""Fused mixture-of-experts weights (transformers 5's 3-D expert parameters) become one linear pair per expert:
same outputs, quantized by every algorithm, experts without calibration tokens on round to nearest, rebuilt by
``lowbit.load`` from the saved names alone."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import InputError
from lowbit.models.tiny import example_inputs, tiny_hf
from lowbit.nn.base import QuantModule
from lowbit.nn.experts import LinearExperts, is_fused_experts, unfuse_experts
from lowbit.plan import QuantPlan, Rule


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def _fused(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules() if is_fused_experts(m)]


def test_unfused_experts_give_the_same_logits():
    model = tiny_hf("qwen3-moe").eval()
    inputs = example_inputs(model, seq=16)
    before = _logits(model, inputs)
    names = _fused(model)
    assert names == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert unfuse_experts(model) == names
    experts = model.get_submodule(names[0])
    assert isinstance(experts, LinearExperts) and experts.num_experts == model.config.num_experts
    assert isinstance(experts.expert(3).gate_up_proj, nn.Linear)
    # fp32 rounding of a different summation order only
    torch.testing.assert_close(_logits(model, inputs), before, atol=1e-5, rtol=0)


_COMMON = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2)
OTHER_FAMILIES = {  # other layouts transformers stores experts in: as Qwen3-MoE; transposed, biased, interleaved
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
    "olmoe": ("OlmoeConfig", "OlmoeForCausalLM", dict(num_experts=4, num_experts_per_tok=2)),
    "gpt-oss": ("GptOssConfig", "GptOssForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8,
                                                          layer_types=["full_attention", "sliding_attention"])),
}


@pytest.mark.parametrize("family", sorted(OTHER_FAMILIES))
def test_other_families_unfuse_and_round_trip(family, tmp_path):
    import transformers

    config_cls, model_cls, kwargs = OTHER_FAMILIES[family]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**_COMMON, **kwargs)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 3:
                p.normal_(0, 0.2)  # experts that matter in the logits
    ids = {"input_ids": torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))}
    before = _logits(model, ids)
    assert len(unfuse_experts(model)) == 2
    torch.testing.assert_close(_logits(model, ids), before, atol=1e-5, rtol=0)
    lowbit.quantize(model, "int8", progress=False)
    expected = _logits(model, ids)
    loaded = lowbit.load(lowbit.save(model, tmp_path / "a"))
    assert torch.equal(_logits(loaded, ids), expected)


def _fused_module(transposed: bool, bias: bool, E: int = 4, H: int = 8, inner: int = 6) -> nn.Module:
    """A transformers-style experts module (the flags use_experts_implementation sets, eager forward)."""

    class Experts(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.num_experts, self.has_gate, self.has_bias = E, True, bias
            self.is_transposed, self.is_concatenated = transposed, True
            self.limit = 0.5
            g = torch.Generator().manual_seed(0)
            up = (E, H, 2 * inner) if transposed else (E, 2 * inner, H)
            down = (E, inner, H) if transposed else (E, H, inner)
            self.gate_up_proj = nn.Parameter(torch.randn(*up, generator=g))
            self.down_proj = nn.Parameter(torch.randn(*down, generator=g))
            if bias:
                self.gate_up_proj_bias = nn.Parameter(torch.randn(E, 2 * inner, generator=g))
                self.down_proj_bias = nn.Parameter(torch.randn(E, H, generator=g))
            self.act_fn = nn.SiLU()

        def _apply_gate(self, gate_up: torch.Tensor) -> torch.Tensor:  # a clamp, as some families have
            gate, up = gate_up.chunk(2, dim=-1)
            return self.act_fn(gate.clamp(max=self.limit)) * up

        def forward(self, x, idx, w):
            out = torch.zeros_like(x)
            for t in range(x.shape[0]):
                for j in range(idx.shape[1]):
                    e = int(idx[t, j])
                    W1 = self.gate_up_proj[e].t() if transposed else self.gate_up_proj[e]
                    W2 = self.down_proj[e].t() if transposed else self.down_proj[e]
                    h = x[t] @ W1.t() + (self.gate_up_proj_bias[e] if bias else 0)
                    h = self._apply_gate(h) @ W2.t() + (self.down_proj_bias[e] if bias else 0)
                    out[t] += w[t, j] * h
            return out

    return Experts()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_layouts_transposed_and_biased(transposed, bias):
    holder = nn.Module()
    holder.experts = _fused_module(transposed, bias)
    fused = holder.experts
    g = torch.Generator().manual_seed(1)
    x, idx = torch.randn(10, 8, generator=g), torch.randint(0, 4, (10, 2), generator=g)
    w = torch.rand(10, 2, generator=g)
    with torch.no_grad():
        want = fused(x, idx, w)
    assert unfuse_experts(holder) == ["experts"]
    with torch.no_grad():
        got = holder.experts(x, idx, w)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_module_that_computes_otherwise_stays_fused(caplog):
    holder = nn.Module()
    holder.experts = _fused_module(False, False)
    holder.experts._apply_gate = lambda h: h[..., :6]  # the instance no longer does what its class says
    with caplog.at_level(logging.WARNING):
        assert unfuse_experts(holder) == []
    assert is_fused_experts(holder.experts)
    assert "keep their fused expert weights in float" in caplog.text


@pytest.mark.parametrize("method", ["rtn", "gptq", "awq"])
def test_experts_quantize_save_and_load(method, tmp_path):
    model = tiny_hf("qwen3-moe")
    data = [example_inputs(model, seed=s, seq=16) for s in range(3)]
    plan = QuantPlan.uniform("int4-ch-asym", method=method)
    lowbit.quantize(model, plan, data if method != "rtn" else None, progress=False)
    expert = model.get_submodule("model.layers.1.mlp.experts.2")
    assert isinstance(expert.gate_up_proj, QuantModule) and isinstance(expert.down_proj, QuantModule)
    inputs = example_inputs(model, seed=7, seq=16)
    expected = _logits(model, inputs)
    path = lowbit.save(model, tmp_path / "a")
    manifest = json.loads((path / "manifest.json").read_text())
    assert "model.layers.0.mlp.experts.0.down_proj" in manifest["layers"]
    loaded = lowbit.load(path)  # the per-expert structure rebuilt from the saved names
    assert torch.equal(_logits(loaded, inputs), expected)
    if method != "rtn":
        coverage = manifest["extra"]["calibration"]["experts"]
        assert coverage["linears"] == 2 * 2 * model.config.num_experts and coverage["max_tokens"] > 0


def _starve(model: nn.Module, block: int, expert: int) -> None:
    """Make block ``block``'s router never pick ``expert`` (another unpicked expert takes its place)."""
    E = model.config.num_experts

    def hook(mod, args, out):
        logits, scores, idx = out
        idx = idx.clone()
        for row in idx:
            if (row == expert).any():
                spare = next(e for e in range(E) if e != expert and not (row == e).any())
                row[row == expert] = spare
        return logits, scores, idx

    model.model.layers[block].mlp.gate.register_forward_hook(hook)


def test_an_expert_without_tokens_uses_round_to_nearest(caplog):
    model = tiny_hf("qwen3-moe")
    data = [example_inputs(model, seed=s, seq=16) for s in range(2)]
    _starve(model, 0, 3)
    with caplog.at_level(logging.INFO):
        lowbit.quantize(model, QuantPlan.uniform("int4-ch-asym", method="gptq"), data, progress=False)
    record = model.lowbit_calibration
    starved = record["fallbacks"]["gptq -> rtn (no calibration tokens)"]
    assert starved == ["model.layers.0.mlp.experts.3.gate_up_proj", "model.layers.0.mlp.experts.3.down_proj"]
    assert isinstance(model.get_submodule(starved[0]), QuantModule)
    assert record["experts"]["no_tokens"] == 2 and record["experts"]["min_tokens"] == 0
    assert "2 saw none and use round to nearest" in caplog.text


def test_static_activations_need_tokens_for_every_expert():
    model = tiny_hf("qwen3-moe")
    data = [example_inputs(model, seed=0, seq=8)]
    _starve(model, 0, 3)
    plan = QuantPlan((Rule("*experts*", "int8", act={"spec": "int8-tensor", "dynamic": False}),),
                     skip=("role:head", "role:embedding"))
    before = {n: p.clone() for n, p in model.state_dict().items()}
    with pytest.raises(InputError, match="no calibration token was routed to this expert"):
        lowbit.quantize(model, plan, data, progress=False)
    assert _fused(model)  # put back as it was, fused
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[n], after[n]) for n in before)


def test_a_skipped_expert_stays_float_through_save_and_load(tmp_path):
    model = tiny_hf("qwen3-moe")
    plan = QuantPlan.uniform("int8", skip=("role:head", "role:embedding", "*.experts.1.*"))
    lowbit.quantize(model, plan, progress=False)
    assert type(model.get_submodule("model.layers.0.mlp.experts.1.down_proj")) is nn.Linear
    inputs = example_inputs(model, seq=16)
    loaded = lowbit.load(lowbit.save(model, tmp_path / "a"))
    assert torch.equal(_logits(loaded, inputs), _logits(model, inputs))

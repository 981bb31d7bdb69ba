"""The architecture table: norm -> linears pairs found per family and checked against the module tree."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.models import tiny
from lowbit.models.arch import FAMILIES, family_of, norm_groups


def _pairs(model: nn.Module) -> dict[str, tuple[str, ...]]:
    return {g.norm: g.linears for g in norm_groups(model)}


def test_llama_pairs():
    pairs = _pairs(tiny.tiny_llama())
    assert pairs["model.layers.1.input_layernorm"] == tuple(f"model.layers.1.self_attn.{p}_proj" for p in "qkv")
    assert pairs["model.layers.0.post_attention_layernorm"] == ("model.layers.0.mlp.gate_proj",
                                                                "model.layers.0.mlp.up_proj")
    assert pairs["model.norm"] == ("lm_head",) and len(pairs) == 5


def test_gemma3_pairs_use_the_pre_feedforward_norm_and_its_offset_gain():
    groups = norm_groups(tiny.tiny_gemma3())
    pairs = {g.norm: g.linears for g in groups}
    assert pairs["model.layers.2.pre_feedforward_layernorm"] == ("model.layers.2.mlp.gate_proj",
                                                                 "model.layers.2.mlp.up_proj")
    assert not any("post_" in n or "q_norm" in n for n in pairs)  # they feed no linear
    assert len(pairs) == 3 * 2 + 1 and all(g.gain_offset == 1.0 for g in groups)


def test_gpt2_and_opt_pairs():
    gpt2 = _pairs(tiny.tiny_gpt2())
    assert gpt2["transformer.h.0.ln_1"] == ("transformer.h.0.attn.c_attn",)
    assert gpt2["transformer.h.1.ln_2"] == ("transformer.h.1.mlp.c_fc",) and gpt2["transformer.ln_f"] == ("lm_head",)
    opt = _pairs(tiny.tiny_opt())
    assert opt["model.decoder.layers.1.final_layer_norm"] == ("model.decoder.layers.1.fc1",)
    assert opt["model.decoder.final_layer_norm"] == ("lm_head",)


def test_a_base_model_without_head_has_no_final_pair():
    pairs = _pairs(tiny.tiny_llama().model)  # LlamaModel: same config, no lm_head
    assert "layers.0.input_layernorm" in pairs and "norm" not in pairs


def test_unknown_family():
    with pytest.raises(InputError, match=r"model_type None .*known families: llama \(llama\), gemma3"):
        family_of(tiny.tiny_cnn())
    assert set(FAMILIES) == {"llama", "gemma3", "gpt2", "opt"}


def test_missing_norm_is_named():
    model = tiny.tiny_gpt2()
    del model.transformer.h[1].ln_2
    with pytest.raises(InputError, match=r"'transformer\.h\.1\.ln_2' not found.*LayerNorm"):
        norm_groups(model)


def test_a_linear_of_the_wrong_width_is_named():
    model = tiny.tiny_llama()
    model.model.layers[0].mlp.up_proj = nn.Linear(32, 128, bias=False)
    with pytest.raises(InputError, match=r"'model\.layers\.0\.mlp\.up_proj' takes 32 inputs but "
                                         r"'model\.layers\.0\.post_attention_layernorm' puts out 64"):
        norm_groups(model)


def test_a_linear_fed_by_something_else_is_found_by_the_forward_pass():
    model = tiny.tiny_llama()
    model.model.layers[1].self_attn.v_proj.register_forward_pre_hook(lambda m, a: (a[0] * 2,))
    with pytest.raises(InputError, match=r"'model\.layers\.1\.self_attn\.v_proj' receives something other than "
                                         r"the output of 'model\.layers\.1\.input_layernorm'"):
        norm_groups(model)
    assert len(norm_groups(model, probe=False)) == 5  # the tree alone cannot see it


def test_post_layernorm_opt_is_refused():
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                       word_embed_proj_dim=64, do_layer_norm_before=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = OPTForCausalLM(config).eval()
    with pytest.raises(InputError, match=r"config\.do_layer_norm_before is False.*self_attn_layer_norm"):
        norm_groups(model)

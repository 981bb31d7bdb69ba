"""GGUF k-quants (Q2_K .. Q6_K) and Q5_0 / Q5_1: lowbit's values as GGML blocks, bit for bit through the gguf
package's dequantizer, and llama.cpp's per-tensor mixes as lowbit plans."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import InputError
from lowbit.export import export_gguf
from lowbit.export.gguf import GGML_TYPES
from lowbit.export.gguf_blocks import blocks
from lowbit.export.gguf_mix import gguf_mix_plan, tensor_type, use_more_bits
from lowbit.formats import quantize as quantize_tensor
from lowbit.nn import QuantLinear
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize
from lowbit.spec import QuantSpec

gguf = pytest.importorskip("gguf")
EXACT = [name for name, kind in GGML_TYPES.items() if kind not in ("Q4_1", "Q5_1")]


def _weight(rows=12, cols=768, seed=0) -> torch.Tensor:
    """Tiles of very different scales, an all-zero tile, an all-negative and an all-positive one."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g) * torch.rand(rows, cols // 16, generator=g).pow(4).repeat_interleave(16, 1)
    w[0, :64] = 0
    w[1, :32] = -w[1, :32].abs() - 0.1
    w[2, :32] = w[2, :32].abs() + 0.1
    return w


@pytest.mark.parametrize("name", EXACT)
def test_every_exact_type_decodes_bit_for_bit_in_the_gguf_package(name):
    spec = QuantSpec.parse(name)
    q = quantize_tensor(_weight(), spec)
    data = blocks(GGML_TYPES[name], q)
    got = gguf.quants.dequantize(data, gguf.GGMLQuantizationType[GGML_TYPES[name]])
    want = q.dequantize().numpy()
    assert got.shape == want.shape and np.array_equal(got.view(np.uint32), want.view(np.uint32))
    assert data.shape[1] == 768 // gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[GGML_TYPES[name]]][0] * \
        gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[GGML_TYPES[name]]][1]


@pytest.mark.parametrize("name", ["int4-g32-asym", "int5-g32-asym"])
def test_q4_1_and_q5_1_hold_the_offset_to_fp16_rounding(name):
    q = quantize_tensor(_weight(), QuantSpec.parse(name))
    got = gguf.quants.dequantize(blocks(GGML_TYPES[name], q), gguf.GGMLQuantizationType[GGML_TYPES[name]])
    offset = (q.zero_point.float() * q.scale).repeat_interleave(32, 1).numpy()
    assert np.all(np.abs(got - q.dequantize().numpy()) <= np.abs(offset) * 2.0**-11 + 1e-12)


@pytest.mark.parametrize("ggml", ["q2_k", "q3_k", "q4_k", "q5_k", "q6_k"])
def test_k_quant_scales_are_integers_times_an_fp16_scale_per_256(ggml):
    spec = QuantSpec.parse(ggml)
    q = quantize_tensor(_weight(), spec)
    d = q.super_scale.repeat_interleave(256 // spec.group_size, 1)
    assert torch.equal(q.super_scale, q.super_scale.half().float())
    sc = q.scale / torch.where(d > 0, d, torch.ones_like(d))
    assert torch.equal(sc, sc.round()) and float(sc.max()) <= {"k4": 15, "k6": 63, "k8": 127}[spec.scale_format]
    assert float(q.scale[0, 0]) == 0  # the all-zero tile
    if spec.has_float_min:
        assert torch.equal(q.super_min, q.super_min.half().float()) and q.zero_point.dtype == torch.uint8
        assert float(q.offset[2, 0]) == 0  # an all-positive tile: its range is widened to 0, so no minimum


def _tiny_k():
    """A Llama whose rows are multiples of 256 (k-quants need them) but for o_proj's 128 attention features."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=256, hidden_size=256, intermediate_size=512, num_hidden_layers=8,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=64,
                                      max_position_embeddings=128, tie_word_embeddings=True)
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


# Q5_K_S's fallback for o_proj is Q5_1, whose fp16 offsets move the logits by about 1e-3 of their range
@pytest.mark.parametrize("mix, tol", [("Q4_K_M", 1e-4), ("Q5_K_S", 4e-3), ("Q6_K", 1e-4)])
def test_a_mix_plan_gives_llama_cpp_types_and_transformers_reads_the_file(tmp_path, mix, tol):
    from transformers import AutoModelForCausalLM

    model = _tiny_k()
    data = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize(model, gguf_mix_plan(model, mix, "gptq"), data, progress=False)
    path = export_gguf(model, None, tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    for i in range(8):
        for leaf, gname, cols in (("v_proj", "attn_v", 256), ("down_proj", "ffn_down", 512),
                                  ("o_proj", "attn_output", 128), ("q_proj", "attn_q", 256)):
            assert types[f"blk.{i}.{gname}.weight"] == tensor_type(mix, leaf, i, 8, cols)
    assert "output.weight" not in types  # tied head, quantized alike: one tensor
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="m.gguf", dtype=torch.float32).eval()
    hf.tie_weights()
    with torch.no_grad():
        a, b = model(_ids()).logits, hf(_ids()).logits
    assert float((a - b).abs().max()) <= tol * float(a.abs().max())


def test_the_q4_k_m_mix_follows_llama_cpp():
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert tensor_type("Q4_K_M", "v_proj", 5, 30, 576) == "Q8_0"  # Q6_K, whose rows need a multiple of 256
    assert tensor_type("Q4_K_M", "v_proj", 4, 30, 576) == "Q5_0"  # Q4_K likewise
    assert tensor_type("Q4_K_M", "down_proj", 4, 30, 1536) == "Q4_K"
    assert tensor_type("Q4_K_M", "down_proj", 29, 30, 1536) == "Q6_K"
    assert tensor_type("Q4_K_M", "output", None, 30, 576) == "Q8_0"
    assert tensor_type("Q5_K_M", "up_proj", 3, 30, 576) == "Q5_1"
    with pytest.raises(InputError, match="unknown GGUF mix 'q9_k'"):
        gguf_mix_plan(_tiny_k(), "q9_k")


def test_k_quant_rows_that_are_not_a_multiple_of_256_are_refused_naming_the_layer(tmp_path):
    model = _tiny_k()
    quantize(model, QuantPlan.uniform("q4_k"), progress=False)  # o_proj has 128 input features
    with pytest.raises(InputError, match=r"layers.0.self_attn.o_proj: Q4_K needs rows of a multiple of 256 .* "
                                         r"int5-g32"):
        export_gguf(model, None, tmp_path / "m.gguf")
    assert list(tmp_path.iterdir()) == []


def test_k_quant_layers_save_load_and_run_on_the_reference_path(tmp_path):
    from lowbit.io import load, save
    from lowbit.kernels import use_kernels

    model = _tiny_k()
    quantize(model, QuantPlan.uniform("q4_k", skip=("*o_proj", "role:head", "role:embedding")), progress=False)
    with torch.no_grad():
        want = model(_ids()).logits
    back = load(save(model, tmp_path / "q"))
    with torch.no_grad():
        assert torch.equal(back(_ids()).logits, want)
    report = use_kernels(back)
    layer = back.model.layers[0].mlp.down_proj
    assert isinstance(layer, QuantLinear) and layer.super_min is not None
    assert "k-quant scales" in report.describe()


def test_cli_quantizes_to_a_mix_and_exports_it(tmp_path, capsys):
    from lowbit.cli import main

    _tiny_k().save_pretrained(tmp_path / "src", safe_serialization=True)
    assert main(["quantize", str(tmp_path / "src"), "--gguf-mix", "q4_k_m", "--out", str(tmp_path / "q")]) == 0
    assert main(["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "q.gguf")]) == 0
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "q.gguf").tensors}
    assert types["blk.0.ffn_down.weight"] == "Q6_K" and types["blk.2.ffn_down.weight"] == "Q4_K"
    assert types["blk.3.attn_output.weight"] == "Q5_0" and types["token_embd.weight"] == "Q6_K"
    capsys.readouterr()
    assert main(["quantize", str(tmp_path / "src"), "--gguf-mix", "q4_k_m", "--act", "int8-token", "--out",
                 str(tmp_path / "bad")]) == 2
    assert "--act cannot be combined with --gguf-mix" in capsys.readouterr().err
    assert main(["quantize", str(tmp_path / "src"), "--gguf-mix", "q7_x", "--out", str(tmp_path / "bad")]) == 2
    assert "unknown --gguf-mix 'q7_x'" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["gptq", "adaround"])
def test_algorithms_choose_values_on_the_k_quant_grid(method):
    from lowbit.algorithms import make_algorithm

    W = _weight(16, 512, seed=3)
    X = torch.randn(256, 512, generator=torch.Generator().manual_seed(4)) * torch.linspace(0.2, 3, 512)
    stats = {"hessian": X.T @ X / 256}
    for name in ("q4_k", "q3_k", "q6_k"):
        spec = QuantSpec.parse(name)
        q = make_algorithm({"name": method, **({"iters": 200} if method == "adaround" else {})}).run(W, stats, spec).q
        assert q.spec == spec and q.super_scale is not None and int(q.codes.max()) < 2**spec.bits
        err = float(((q.dequantize() - W) @ X.T).pow(2).mean())
        rtn = float(((quantize_tensor(W, spec).dequantize() - W) @ X.T).pow(2).mean())
        assert err < rtn, (name, err, rtn)  # both minimise the layer's output error, on the same kind of grid


def test_awq_scales_folded_into_the_norms_export_to_gguf(tmp_path):
    from transformers import AutoModelForCausalLM

    model = _tiny_k()
    data = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    plan = gguf_mix_plan(model, "Q4_K_M", "gptq", ("awq_scales",))
    assert plan.transforms == ("awq_scales",)
    norm = model.model.layers[0].input_layernorm.weight.detach().clone()
    quantize(model, plan, data, progress=False)
    assert not torch.equal(model.model.layers[0].input_layernorm.weight, norm)  # the scales went into the norm
    assert all(getattr(m, "input_scale", None) is None for m in model.modules())
    path = export_gguf(model, None, tmp_path / "m.gguf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    hf.tie_weights()
    with torch.no_grad():
        a, b = model(_ids()).logits, hf(_ids()).logits
    assert float((a - b).abs().max()) <= 1e-4 * float(a.abs().max())


def test_a_mix_leaves_gemmas_scaled_embedding_and_its_tied_head_float(tmp_path, caplog):
    from lowbit.models.tiny import tiny_hf

    model = tiny_hf("gemma3")
    plan = gguf_mix_plan(model, "Q4_K_M")
    assert "model.embed_tokens" in plan.skip and not any(r.pattern in ("lm_head", "model.embed_tokens")
                                                         for r in plan.rules)
    assert "stays float in the mix, with the head tied to it" in caplog.text
    quantize(model, plan, progress=False)
    assert type(model.lm_head).__name__ == "Linear" and model.lm_head.weight is model.model.embed_tokens.weight
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(export_gguf(model, None, tmp_path / "g.gguf")).tensors}
    assert types["token_embd.weight"] == "F32" and types["blk.0.attn_q.weight"] == "Q5_0"

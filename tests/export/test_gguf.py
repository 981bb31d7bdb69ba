"""GGUF export: lowbit's codes written as GGML blocks, read back by the gguf package and by transformers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lowbit.errors import InputError
from lowbit.export import export_gguf
from lowbit.models import load_model
from lowbit.nn import QuantLinear
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize

gguf = pytest.importorskip("gguf")


def _tiny(scheme: str, skip=("lm_head", "type:Embedding"), method="rtn"):
    lm = load_model("tiny-llama")
    quantize(lm.model, QuantPlan.uniform(scheme, method, skip=skip), progress=False)
    return lm


def _load_hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()


def _ids():
    return torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("scheme,ggml,tol", [("int4-g32", "Q4_0", 1e-5), ("int8-g32", "Q8_0", 1e-5),
                                             ("int4-g32-asym", "Q4_1", 2e-3)])
def test_export_is_read_back_with_the_same_weights_and_outputs(tmp_path, scheme, ggml, tol):
    lm = _tiny(scheme, skip=())  # the embedding and lm_head quantized too
    path = export_gguf(lm.model, lm.source, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_q.weight"] == types["token_embd.weight"] == types["output.weight"] == ggml
    assert types["blk.1.ffn_norm.weight"] == "F32"
    # the blocks decode to lowbit's own weight (down_proj: no rotary permutation)
    t = next(t for t in reader.tensors if t.name == "blk.1.ffn_down.weight")
    w = gguf.quants.dequantize(t.data, t.tensor_type)
    ref = lm.model.model.layers[1].mlp.down_proj.dequantized_weight()
    assert np.abs(w - ref.numpy()).max() <= tol * float(ref.abs().max())
    hf = _load_hf(path)
    with torch.no_grad():
        a, b = lm.model(_ids()).logits, hf(_ids()).logits
    assert float((a - b).abs().max()) <= tol * 20 * float(a.abs().max())


def test_float_tied_head_is_written_once_and_reproduces_the_model(tmp_path):
    lm = load_model("tiny-llama")
    lm.model.lm_head.weight = lm.model.model.embed_tokens.weight  # tie, as SmolLM2 does
    quantize(lm.model, QuantPlan.uniform("int4-g32"), progress=False)
    path = export_gguf(lm.model, lm.source, tmp_path / "m.gguf")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    with torch.no_grad():
        hf = _load_hf(path)
        hf.tie_weights()
        assert torch.allclose(lm.model(_ids()).logits, hf(_ids()).logits, atol=1e-5)


def test_formats_gguf_cannot_hold_are_refused_with_the_module_named(tmp_path):
    dest = tmp_path / "m.gguf"
    with pytest.raises(InputError, match=r"self_attn.q_proj: weight format int4-g64-asym has no GGML block type"):
        export_gguf(_tiny("int4-g64-asym").model, None, dest)
    lm2 = _tiny("int4-g32")
    attn = lm2.model.model.layers[0].self_attn
    q = attn.q_proj  # what AWQ leaves: the same codes with a per-input-channel scale
    attn.q_proj = QuantLinear.from_float(torch.randn(q.out_features, q.in_features), None, q.quantized_weight(),
                                         None, torch.ones(q.in_features))
    with pytest.raises(InputError, match="layers.0.self_attn.q_proj: has AWQ per-input-channel scales"):
        export_gguf(lm2.model, None, dest)
    with pytest.raises(InputError, match="activation quantization"):
        lm3 = load_model("tiny-llama")
        quantize(lm3.model, QuantPlan.uniform("int8-g32", act="int8-token"), progress=False)
        export_gguf(lm3.model, None, dest)
    with pytest.raises(InputError, match="llama, mistral, qwen2, qwen3, gemma3_text; this model.s is .gpt2."):
        export_gguf(load_model("tiny-gpt2").model, None, dest)
    assert list(tmp_path.iterdir()) == []  # nothing written, not even a partial file


def test_an_existing_file_is_kept_unless_overwrite(tmp_path):
    dest = tmp_path / "m.gguf"
    dest.write_bytes(b"keep")
    lm = _tiny("int4-g32")
    with pytest.raises(InputError, match="exists"):
        export_gguf(lm.model, lm.source, dest)
    assert dest.read_bytes() == b"keep"
    export_gguf(lm.model, lm.source, dest, overwrite=True)
    assert dest.read_bytes()[:4] == b"GGUF"


def test_cli_export_writes_a_gguf_from_a_saved_folder_and_names_what_it_cannot_store(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.io import save

    lm = _tiny("int4-g32")
    save(lm.model, tmp_path / "q", source=lm.source)
    assert main(["export", str(tmp_path / "q"), "--format", "gguf", "--out", str(tmp_path / "q.gguf")]) == 0
    assert "wrote" in capsys.readouterr().out and gguf.GGUFReader(tmp_path / "q.gguf").tensors
    lm = _tiny("int4-g64")
    save(lm.model, tmp_path / "g64", source=lm.source)
    assert main(["export", str(tmp_path / "g64"), "--format", "gguf", "--out", str(tmp_path / "g64.gguf")]) == 2
    assert "int4-g64 has no GGML block type" in capsys.readouterr().err
    assert not (tmp_path / "g64.gguf").exists()


def test_a_quantized_head_equal_to_the_quantized_embedding_is_stored_once(tmp_path):
    lm = load_model("tiny-llama")
    lm.model.lm_head.weight = lm.model.model.embed_tokens.weight
    quantize(lm.model, QuantPlan.uniform("int8-g32", skip=()), progress=False)
    path = export_gguf(lm.model, lm.source, tmp_path / "m.gguf")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names
    hf = _load_hf(path)
    hf.tie_weights()
    with torch.no_grad():
        assert torch.allclose(lm.model(_ids()).logits, hf(_ids()).logits, atol=1e-4)


def test_the_gguf_recipe_gives_a_model_the_exporter_takes_whole(tmp_path):
    lm = load_model("tiny-llama")
    lm.model.lm_head.weight = lm.model.model.embed_tokens.weight
    plan = QuantPlan.load("recipes/gguf-q4_0-gptq.yaml")
    data = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    quantize(lm.model, plan, data, progress=False)
    path = export_gguf(lm.model, lm.source, tmp_path / "m.gguf")
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["token_embd.weight"] == "Q8_0" and "output.weight" not in types
    assert {types[n] for n in types if n.startswith("blk.") and not n.endswith("norm.weight")} == {"Q4_0"}


def test_a_tied_model_after_the_offline_rotation_exports_with_its_own_head(tmp_path):
    lm = load_model("tiny-llama")
    lm.model.lm_head.weight = lm.model.model.embed_tokens.weight  # tied, as SmolLM2
    lm.model.config.tie_word_embeddings = True
    plan = QuantPlan(QuantPlan.uniform("int4-g32").rules, transforms=("rotate_residual",))
    quantize(lm.model, plan, progress=False)
    path = export_gguf(lm.model, lm.source, tmp_path / "m.gguf")
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" in names  # untied by the rotation: the head carries the final norm's gain
    with torch.no_grad():
        assert torch.allclose(lm.model(_ids()).logits, _load_hf(path)(_ids()).logits, atol=1e-4)


def test_online_rotations_are_refused_by_name(tmp_path):
    lm = load_model("tiny-llama")
    quantize(lm.model, QuantPlan(QuantPlan.uniform("int4-g32").rules, transforms=("rotate",)), progress=False)
    with pytest.raises(InputError, match=r"model\.layers\.0\.self_attn\.o_proj: rotates its input online.*"
                                         r"rotate_residual"):
        export_gguf(lm.model, lm.source, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.parametrize("family, arch", [("mistral", "llama"), ("qwen2", "qwen2"), ("qwen3", "qwen3"),
                                          ("gemma3", "gemma3")])
def test_other_architectures_export_and_transformers_reproduces_them(tmp_path, family, arch):
    from lowbit.models.tiny import tiny_decoder

    # transformers' GGUF reader takes Qwen3's head_dim as its default, 128
    model = tiny_decoder(family, **({"head_dim": 128} if family == "qwen3" else {}),
                         **({"sliding_window": 16} if family == "gemma3" else {}))
    quantize(model, QuantPlan.uniform("int8-g32"), progress=False)
    path = export_gguf(model, None, tmp_path / "m.gguf")
    reader = gguf.GGUFReader(path)
    assert reader.fields["general.architecture"].contents() == arch
    names = {t.name for t in reader.tensors}
    if family == "qwen2":
        assert {"blk.0.attn_q.bias", "blk.1.attn_v.bias"} <= names  # the biases of quantized layers
    if family in ("qwen3", "gemma3"):
        assert "blk.0.attn_q_norm.weight" in names
    if family == "gemma3":  # norms as 1 + w, the gain llama.cpp multiplies by
        t = next(t for t in reader.tensors if t.name == "blk.0.attn_norm.weight")
        w = model.model.layers[0].input_layernorm.weight.detach().numpy()
        assert np.allclose(t.data, w + 1)
    hf = _load_hf(path)
    hf.tie_weights()
    with torch.no_grad():
        a, b = model(_ids()).logits, hf(_ids()).logits
    assert torch.allclose(a, b, atol=1e-5, rtol=0)

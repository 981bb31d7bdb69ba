"""compressed-tensors pack-quantized export: loaded by transformers (with the compressed-tensors package) with the
model's own outputs, and read back by lowbit bit for bit."""

from __future__ import annotations

import json
import re

import pytest
import safetensors.torch
import torch

from lowbit.cli import main
from lowbit.errors import InputError
from lowbit.export.compressed_tensors import check_in_transformers, export_compressed_tensors
from lowbit.io.compressed_tensors import pack_int32, unpack_int32
from lowbit.models import load_model
from lowbit.models.tiny import tiny_hf
from lowbit.nn import QuantLinear
from lowbit.plan import QuantPlan, Rule
from lowbit.quantizer import quantize

ct = pytest.importorskip("compressed_tensors")


def _ids():
    return torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(0))


def _hf(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def _logits(model):
    with torch.no_grad():
        return model(_ids()).logits


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 6, 7, 8])
def test_packing_is_compressed_tensors_own(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    codes = torch.randint(0, 2**bits, (6, 70), dtype=torch.uint8, generator=torch.Generator().manual_seed(bits))
    signed = (codes.to(torch.int16) - 2 ** (bits - 1)).to(torch.int8)
    assert torch.equal(pack_int32(codes, bits), pack_to_int32(signed, bits))
    assert torch.equal(pack_int32(codes.t().contiguous(), bits).t(), pack_to_int32(signed, bits, packed_dim=0))
    assert torch.equal(unpack_int32(pack_int32(codes, bits), bits, 70), codes)


@pytest.mark.parametrize("family, plan", [
    ("llama", QuantPlan.uniform("int4-g32-asym")),
    ("llama", QuantPlan.uniform("int4-g32")),
    ("llama", QuantPlan.uniform("int8")),
    ("llama", QuantPlan.uniform("int3-g64-asym-sbf16")),
    ("qwen3", QuantPlan((Rule("*mlp*", "int8-asym"), Rule("*", "int4-g16-asym")), skip=("type:Embedding",))),
    ("gemma3", QuantPlan.uniform("int4-g32-asym", "gptq")),
])
def test_transformers_loads_the_export_and_lowbit_reads_it_back(tmp_path, family, plan):
    model = tiny_hf(family)
    data = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize(model, plan, data if plan.needs_data else None, progress=False)
    folder = export_compressed_tensors(model, tmp_path / "ct")
    config = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors" and config["format"] == "pack-quantized"
    specs = {m.spec for m in model.modules() if isinstance(m, QuantLinear)}
    assert len(config["config_groups"]) == len(specs)
    want = _logits(model)
    assert torch.allclose(_logits(_hf(folder)), want, atol=1e-5, rtol=0)  # compressed-tensors' own decompression
    back = load_model(folder).model
    assert torch.allclose(_logits(back), want, atol=1e-5, rtol=0)
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            b = back.get_submodule(name)
            assert isinstance(b, QuantLinear) and b.spec == m.spec
            assert torch.equal(b.qweight, m.qweight) and torch.equal(b.scale, m.scale)
            assert (m.zero_point is None) == (b.zero_point is None)
            assert m.zero_point is None or torch.equal(b.zero_point, m.zero_point)


def test_a_quantized_head_unties_it_and_a_tied_float_head_stays_tied(tmp_path):
    import transformers

    config = tiny_hf("llama").config
    config.tie_word_embeddings = True
    tied = transformers.LlamaForCausalLM(config).eval()
    quantize(tied, QuantPlan.uniform("int4-g32"), progress=False)  # head and embedding stay float, tied
    folder = export_compressed_tensors(tied, tmp_path / "tied")
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in safetensors.torch.load_file(folder / "model.safetensors")
    assert torch.allclose(_logits(_hf(folder)), _logits(tied), atol=1e-5, rtol=0)
    head = transformers.LlamaForCausalLM(config).eval()
    quantize(head, QuantPlan.uniform("int4-g32", skip=("type:Embedding",)), progress=False)
    folder = export_compressed_tensors(head, tmp_path / "head")
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    assert "lm_head.weight_packed" in safetensors.torch.load_file(folder / "model.safetensors")
    assert torch.allclose(_logits(_hf(folder)), _logits(head), atol=1e-5, rtol=0)
    assert isinstance(load_model(folder).model.lm_head, QuantLinear)


def test_the_check_catches_a_folder_transformers_reads_differently(tmp_path):
    model = tiny_hf("llama")
    quantize(model, QuantPlan.uniform("int4-g32-asym"), progress=False)
    folder = export_compressed_tensors(model, tmp_path / "ct", check=False)
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    key = "model.layers.0.mlp.down_proj.weight_scale"
    tensors[key] = tensors[key] * 2
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match="logits up to .* away from lowbit's"):
        check_in_transformers(model, folder)


@pytest.mark.parametrize("plan, why", [
    (QuantPlan.uniform("int4-g48-asym"), r"64 input features are not a whole number of groups of 48.*fit: 64, 32"),
    (QuantPlan.uniform("nf4-g32"), "not an integer format per channel or in groups"),
    (QuantPlan.uniform("int8", act="int8-token"), "activation quantization"),
    (QuantPlan.uniform("int4-g32", "awq"), "AWQ per-input-channel scales"),
    (QuantPlan.uniform("int4-g32", "gptq", bias_correction=True), "has a bias that LlamaForCausalLM's layer does not"),
])
def test_what_pack_quantized_cannot_hold_is_refused_naming_the_module(tmp_path, plan, why):
    model = tiny_hf("llama")
    data = torch.randint(3, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    quantize(model, plan, data if plan.needs_data else None, progress=False)
    with pytest.raises(InputError, match=why):
        export_compressed_tensors(model, tmp_path / "ct")
    assert not (tmp_path / "ct").exists()


def test_the_output_folder_is_checked(tmp_path):
    model = tiny_hf("llama")
    with pytest.raises(InputError, match="no quantized linear layer"):
        export_compressed_tensors(model, tmp_path / "float")
    quantize(model, QuantPlan.uniform("int4-g32"), progress=False)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(InputError, match="not a compressed-tensors export; lowbit will not replace it"):
        export_compressed_tensors(model, tmp_path / "other", overwrite=True)
    export_compressed_tensors(model, tmp_path / "ct")
    with pytest.raises(InputError, match="pass --overwrite"):
        export_compressed_tensors(model, tmp_path / "ct")
    export_compressed_tensors(model, tmp_path / "ct", overwrite=True)


def test_folders_lowbit_cannot_read_are_refused(tmp_path):
    model = tiny_hf("llama")
    quantize(model, QuantPlan.uniform("int4-g32"), progress=False)
    folder = export_compressed_tensors(model, tmp_path / "ct")
    tensors = safetensors.torch.load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.up_proj.weight_g_idx"] = torch.zeros(64, dtype=torch.int32)
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"model.layers.0.mlp.up_proj: activation-ordered groups"):
        load_model(folder)
    del tensors["model.layers.0.mlp.up_proj.weight_g_idx"], tensors["model.layers.0.mlp.up_proj.weight_scale"]
    safetensors.torch.save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"mlp.up_proj: packed weights without weight_scale"):
        load_model(folder)
    raw = json.loads((folder / "config.json").read_text())
    raw["quantization_config"]["format"] = "float-quantized"
    (folder / "config.json").write_text(json.dumps(raw))
    with pytest.raises(InputError, match="compressed-tensors format 'float-quantized'; lowbit reads 'pack-quantized'"):
        load_model(folder)


def test_cli_exports_an_artifact_that_lowbit_evaluates(tmp_path, capsys):
    from lowbit.models.tiny import tiny_hf_tokenizer

    source = tmp_path / "llama"
    tiny_hf("llama").save_pretrained(source, safe_serialization=True)
    tiny_hf_tokenizer().save_pretrained(source)
    assert main(["quantize", str(source), "--scheme", "int4-g32-asym", "--out", str(tmp_path / "q")]) == 0
    capsys.readouterr()
    assert main(["export", str(tmp_path / "q"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 0
    assert re.search(r"wrote .*ct \([0-9.]+ MB", capsys.readouterr().out)
    assert (tmp_path / "ct" / "tokenizer.json").is_file()
    assert main(["eval", str(tmp_path / "ct"), "--tokens", "512"]) == 0
    assert re.search(r"perplexity [0-9.]+", capsys.readouterr().out)
    assert main(["export", str(tmp_path / "q"), "--format", "compressed-tensors", "--out", str(tmp_path / "ct")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err

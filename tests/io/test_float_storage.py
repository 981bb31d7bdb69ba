"""Float parts (embeddings, norms, a float head) stored in the source model's dtype: exact, smaller, widened back
by load so outputs do not change."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.errors import CorruptFileError, InputError
from lowbit.models.hf import stored_float_dtype
from lowbit.models.tiny import example_inputs, tiny_hf, tiny_hf_tokenizer


def _half_exact(family: str = "llama", dtype: torch.dtype = torch.float16):
    """A tiny model whose float32 weights are exactly ``dtype`` values (as one loaded from a float16 folder;
    buffers such as the rotary frequencies stay as computed)."""
    model = tiny_hf(family)
    with torch.no_grad():
        for p in model.parameters():
            p.data = p.data.to(dtype).float()
    return model


def _logits(model, inputs):
    with torch.no_grad():
        return model(**inputs)[0]


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_float_parts_narrowed_and_widened_back(dtype, tmp_path):
    model = _half_exact("llama", getattr(torch, dtype))
    lowbit.quantize(model, "int8", progress=False)
    inputs = example_inputs(model)
    expected = _logits(model, inputs)
    wide = lowbit.save(model, tmp_path / "wide")
    narrow = lowbit.save(model, tmp_path / "narrow", float_dtype=dtype)
    manifest = json.loads((narrow / "manifest.json").read_text())
    stored = manifest["float_storage"]
    assert stored["dtype"] == dtype
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(stored["tensors"])
    assert not any(".self_attn.q_proj." in k for k in stored["tensors"])  # quantized layers keep their storage
    assert "float_storage" not in json.loads((wide / "manifest.json").read_text())
    assert (narrow / "model.safetensors").stat().st_size < (wide / "model.safetensors").stat().st_size
    loaded = lowbit.load(narrow)
    assert loaded.model.embed_tokens.weight.dtype == torch.float32
    assert torch.equal(_logits(loaded, inputs), expected)


def test_a_tensor_that_is_not_exact_stays_wide(tmp_path):
    model = _half_exact()
    with torch.no_grad():
        model.model.norm.weight[0] += 1e-6  # as a transform would change it
    lowbit.quantize(model, "int8", progress=False)
    path = lowbit.save(model, tmp_path / "a", float_dtype="float16")
    stored = json.loads((path / "manifest.json").read_text())["float_storage"]["tensors"]
    assert "model.norm.weight" not in stored and "model.embed_tokens.weight" in stored
    inputs = example_inputs(model)
    assert torch.equal(_logits(lowbit.load(path), inputs), _logits(model, inputs))


def test_a_tied_head_stays_tied(tmp_path):
    model = _half_exact("gemma3")
    lowbit.quantize(model, "int8", progress=False)
    path = lowbit.save(model, tmp_path / "a", float_dtype="float16")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["tied_tensors"] and "model.embed_tokens.weight" in manifest["float_storage"]["tensors"]
    loaded = lowbit.load(path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    assert loaded.lm_head.weight.dtype == torch.float32


def test_bad_arguments_and_manifests(tmp_path):
    model = _half_exact()
    lowbit.quantize(model, "int8", progress=False)
    with pytest.raises(InputError, match="float_dtype must be one of float16, bfloat16"):
        lowbit.save(model, tmp_path / "x", float_dtype="float8")
    assert not (tmp_path / "x").exists()
    path = lowbit.save(model, tmp_path / "a", float_dtype="float16")
    mpath = path / "manifest.json"
    manifest = json.loads(mpath.read_text())
    manifest["float_storage"]["dtype"] = "int8"
    mpath.write_text(json.dumps(manifest))
    with pytest.raises(CorruptFileError, match="float_storage must be"):
        lowbit.load(path)


def test_stored_dtype_read_from_the_weights(tmp_path):
    tiny_hf("llama").half().save_pretrained(tmp_path / "h", safe_serialization=True)
    tiny_hf("llama").save_pretrained(tmp_path / "f", safe_serialization=True)
    assert stored_float_dtype(tmp_path / "h") == "float16"
    assert stored_float_dtype(tmp_path / "f") is None
    assert stored_float_dtype(tmp_path) is None  # no weights


def test_cli_keeps_the_source_dtype(tmp_path, capsys):
    from lowbit.cli import main

    tiny_hf("llama").half().save_pretrained(tmp_path / "m", safe_serialization=True)
    tiny_hf_tokenizer().save_pretrained(tmp_path / "m")
    assert main(["quantize", str(tmp_path / "m"), "--scheme", "int4-g32-asym", "--out", str(tmp_path / "q")]) == 0
    assert "float parts stored in float16, as in the source" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["float_storage"]["dtype"] == "float16"
    src = (tmp_path / "m" / "model.safetensors").stat().st_size
    assert (tmp_path / "q" / "model.safetensors").stat().st_size < src  # smaller than the float16 source
    assert main(["eval", str(tmp_path / "q"), "--tokens", "256", "--window", "64", "--agreement-tokens", "128"]) == 0

"""load_model / build_skeleton / sources: errors name the path, sources round-trip through JSON."""

import json

import pytest
import torch

from lowbit.errors import InputError
from lowbit.models import (
    BUNDLED_MODELS,
    ByteTokenizer,
    LoadedModel,
    build_skeleton,
    is_tied,
    load_model,
    load_tokenizer,
    resolve_source,
    tiny_llama,
)


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


# ---- errors -------------------------------------------------------------------------------------


def test_unknown_name():
    with pytest.raises(InputError, match="no-such-model.*bundled"):
        load_model("no-such-model")


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match="missing.gguf"):
        load_model(str(tmp_path / "missing.gguf"))


def test_folder_without_config(tmp_path):
    with pytest.raises(InputError, match="no config.json"):
        load_model(str(tmp_path))


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(InputError, match="no weights"):
        load_model(str(tmp_path))


def test_folder_with_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="config.json"):
        load_model(str(tmp_path))


def test_not_a_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(InputError, match="not a GGUF"):
        load_model(str(bad))


def test_truncated_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00")  # valid magic and version, then nothing
    with pytest.raises(InputError, match="model.gguf"):
        load_model(str(bad))


def test_unsupported_file(tmp_path):
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\x00")
    with pytest.raises(InputError, match="expected a .gguf"):
        load_model(str(other))


@pytest.mark.parametrize("source", [{}, {"type": "zip"}, {"type": "bundled", "name": "x"}, {"type": "gguf"}])
def test_bad_source_dicts(source):
    with pytest.raises(InputError):
        resolve_source(source)


# ---- bundled tiny models and HF folders ---------------------------------------------------------


def test_bundled_tiny_model():
    loaded = load_model("tiny-llama")
    assert isinstance(loaded, LoadedModel)
    assert loaded.kind == "causal-lm" and isinstance(loaded.tokenizer, ByteTokenizer)
    assert json.loads(json.dumps(loaded.source)) == {"type": "bundled", "name": "tiny-llama"}
    assert _shapes(build_skeleton(loaded.source)) == _shapes(loaded.model)
    assert load_model("tiny-cnn").tokenizer is None


def test_registry_kinds():
    assert {"smollm2-135m", "efficientnet-lite0"} <= set(BUNDLED_MODELS)
    assert all(e.kind in ("causal-lm", "image-classifier") for e in BUNDLED_MODELS.values())


def test_hf_folder_round_trip(tmp_path):
    original = tiny_llama(seed=3)
    original.save_pretrained(tmp_path)
    loaded = load_model(str(tmp_path))
    assert loaded.kind == "causal-lm" and loaded.tokenizer is None
    assert loaded.source["type"] == "hf-folder" and loaded.source["path"] == str(tmp_path.resolve())
    ids = torch.randint(0, 256, (1, 16))
    with torch.inference_mode():
        assert torch.equal(loaded.model(ids).logits, original(ids).logits)
    source = json.loads(json.dumps(loaded.source))  # JSON-able, config included
    assert _shapes(build_skeleton(source)) == _shapes(original)
    del source["config"]  # without the stored config the folder's config.json is read
    skeleton = build_skeleton(source)
    assert _shapes(skeleton) == _shapes(original) and not skeleton.training
    assert load_tokenizer(source) is None
    assert load_model(loaded.source).kind == "causal-lm"  # a source dict loads too


# ---- real bundled models ------------------------------------------------------------------------


@pytest.mark.e2e
def test_smollm2_loads_and_generates():
    loaded = load_model("smollm2-135m")
    model, tok = loaded.model, loaded.tokenizer
    assert loaded.kind == "causal-lm" and not model.training
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert is_tied(model)  # lm_head shares the embedding (tie_word_embeddings in the GGUF)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tok("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.shape[1]:])
    skeleton = build_skeleton({"type": "bundled", "name": "smollm2-135m"})
    assert _shapes(skeleton) == _shapes(model) and is_tied(skeleton)


@pytest.mark.e2e
def test_efficientnet_classifies_photos():
    from lowbit.data import load_image, photo_paths

    loaded = load_model("efficientnet-lite0")
    assert loaded.kind == "image-classifier" and loaded.tokenizer is None
    paths = {p.stem: p for p in photo_paths()}
    images = torch.stack([load_image(paths["chelsea"]), load_image(paths["coffee"])])
    with torch.inference_mode():
        top1 = loaded.model(images).argmax(dim=1).tolist()
    assert 281 <= top1[0] <= 285  # a domestic cat class (tabby, tiger cat, Persian, Siamese, Egyptian)
    assert top1[1] in (967, 968, 504)  # espresso, cup, coffee mug
    skeleton = build_skeleton(loaded.source)
    skeleton.load_state_dict(loaded.model.state_dict())  # strict: same architecture

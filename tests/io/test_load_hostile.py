"""A hostile user's artifacts: every refusal comes before memory or another file follows the artifact's claims.

Each case edits a saved artifact as an attacker would, recomputing the SHA-256 the manifest records where the
edit touches ``model.safetensors`` (so the checksum cannot be what catches it), and checks the error class,
that the message names the file and what is wrong, and, through the command line, exit code 2 without a
traceback. Quantize-side checks on the same families (NaN in a bias, scales outside their storage) are at the
end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from pathlib import Path

import pytest
import torch

import lowbit
from io_models import TextNet, memory_bound, quantized, seeded
from lowbit.cli import main
from lowbit.errors import CorruptFileError, InputError
from lowbit.io import load, save
from lowbit.models import tiny_llama

LLAMA_SOURCE = {"type": "bundled", "name": "tiny-llama"}


@pytest.fixture
def art(tmp_path) -> Path:
    """TextNet quantized to int4-g64-asym (zero points), saved without a source."""
    return save(quantized(TextNet, "int4-g64-asym"), tmp_path / "art")


@pytest.fixture
def llama_art(tmp_path) -> Path:
    """tiny Llama, int4-g32-asym, saved with its bundled source (load builds the skeleton itself)."""
    model = tiny_llama()
    lowbit.quantize(model, "int4-g32-asym", progress=False)
    return save(model, tmp_path / "llama", source=LLAMA_SOURCE)


def _manifest(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def _write_manifest(path: Path, m: dict) -> None:
    (path / "manifest.json").write_text(json.dumps(m))


def _edit_header(path: Path, change) -> None:
    """Apply ``change`` to the safetensors header and record the new file's size and SHA-256 in the manifest."""
    f = path / "model.safetensors"
    raw = f.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    data = struct.pack("<Q", len(text)) + text + raw[8 + n:]
    f.write_bytes(data)
    m = _manifest(path)
    m["files"]["model.safetensors"] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _write_manifest(path, m)


def _cli(capsys, *argv) -> tuple[int, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    return rc, capsys.readouterr().err


def _assert_cli_refuses(capsys, path: Path, *fragments: str) -> None:
    for command in (("inspect", path, "--no-reference"), ("eval", path)):
        rc, err = _cli(capsys, *command)
        assert rc == 2 and "Traceback" not in err, err
        for f in fragments:
            assert f in err, (f, err)


# ---- dtypes are checked against the layer records (item 2) ----------------------------------------------------


def test_scale_dtype_changed_in_the_header(llama_art, capsys):
    """fp16 scales relabelled bf16 (same bytes, other numbers): refused, not loaded with changed logits."""
    key = "model.layers.0.mlp.down_proj.scale"
    _edit_header(llama_art, lambda h: h[key].update(dtype="BF16"))
    with pytest.raises(CorruptFileError, match=rf"model\.safetensors: .*{key}: file torch\.bfloat16, expected "
                                               rf"torch\.float16.*modified after saving"):
        load(llama_art)
    _assert_cli_refuses(capsys, llama_art, "model.safetensors", key)


def test_packed_weight_dtype_changed_in_the_header(art):
    _edit_header(art, lambda h: h["up.qweight"].update(dtype="I8"))
    with pytest.raises(CorruptFileError, match=r"up\.qweight: file torch\.int8, expected torch\.uint8"):
        load(art, model=seeded(TextNet))


def test_float_parameter_relabelled_as_integers(art):
    _edit_header(art, lambda h: h["norm.weight"].update(dtype="I32"))
    with pytest.raises(CorruptFileError, match=r"norm\.weight: file torch\.int32"):
        load(art, model=seeded(TextNet))


# ---- sizes are checked before anything is allocated (item 3) ---------------------------------------------------


@pytest.mark.parametrize("features, message", [
    (200_000, r"stores a QuantLinear \(200000, 200000\) .* has weight \(64, 128\)"),  # built on meta, refused
    (-4, r"bad record .*in_features.* must be an integer in 1\.\."),
    (True, r"bad record .*in_features.* must be an integer"),
    (2**40, r"bad record .*in_features"),
])
def test_huge_or_negative_layer_widths(llama_art, capsys, features, message):
    m = _manifest(llama_art)
    m["layers"]["model.layers.0.mlp.down_proj"]["config"].update(in_features=features, out_features=features)
    _write_manifest(llama_art, m)
    with memory_bound(512 * 2**20), pytest.raises(InputError, match=message):
        load(llama_art)
    _assert_cli_refuses(capsys, llama_art, "model.layers.0.mlp.down_proj")


def _with_source_config(tmp_path: Path, **change) -> Path:
    """An int8 tiny Llama saved with a Hugging Face source whose recorded config then gets ``change``."""
    model = tiny_llama()
    lowbit.quantize(model, "int8", progress=False)
    source = {"type": "hf-folder", "path": str(tmp_path / "gone"), "config": model.config.to_dict()}
    path = save(model, tmp_path / "a", source=source)
    m = _manifest(path)
    m["source"]["config"].update(change)
    _write_manifest(path, m)
    return path


def test_source_config_with_a_huge_vocabulary(tmp_path):
    """A recorded config of a 50M-token vocabulary (tens of GB as float) is refused on the meta device."""
    path = _with_source_config(tmp_path, vocab_size=50_000_000)
    with memory_bound(512 * 2**20), pytest.raises(InputError, match=r"does not fit the model.*shape"):
        load(path)


def test_source_config_with_a_million_layers(tmp_path):
    path = _with_source_config(tmp_path, num_hidden_layers=1_000_000)
    with pytest.raises(CorruptFileError, match=r"num_hidden_layers=1000000 does not fit the \d+ tensor"):
        load(path)


@pytest.mark.parametrize("change", [
    {"hidden_size": 30},  # not a multiple of the head count
    {"num_attention_heads": 0},
    {"rope_parameters": "fast"},
    {"model_type": "no-such-model"},
])
def test_inconsistent_source_config(tmp_path, capsys, change):
    path = _with_source_config(tmp_path, **change)
    with pytest.raises(InputError, match=r"a: |manifest\.json"):
        load(path)
    rc, err = _cli(capsys, "inspect", path, "--no-reference")
    assert rc == 2 and "Traceback" not in err and str(path) in err, err


# ---- the manifest's source is followed only after the artifact checks out, never to a pickle (item 4) ----------


def _pickle_folder(folder: Path, marker: Path) -> None:
    """A model folder whose only weights are a pickle that would create ``marker`` if it were ever unpickled."""
    folder.mkdir()
    tiny_llama().config.to_json_file(folder / "config.json")

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    import pickle

    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))


def test_eval_refuses_a_source_folder_of_pickles(tmp_path, capsys):
    model = tiny_llama()
    lowbit.quantize(model, "int8", progress=False)
    folder, marker = tmp_path / "evil", tmp_path / "PWNED"
    _pickle_folder(folder, marker)
    path = save(model, tmp_path / "a", source={"type": "hf-folder", "path": str(folder)})
    for command in (("eval", path), ("inspect", path)):
        rc, err = _cli(capsys, *command)
        assert rc == 2 and "Traceback" not in err, err
        assert str(folder) in err and "pickled" in err and "never unpickles" in err, err
    assert not marker.exists()
    with pytest.raises(InputError, match=r"pytorch_model\.bin.*never unpickles"):
        lowbit.load_model(folder)


def test_eval_checks_the_artifact_before_loading_the_float_model(llama_art, capsys, monkeypatch):
    import lowbit.cli

    loaded = []
    monkeypatch.setattr(lowbit.cli, "load_model_from_source", lambda src: loaded.append(src))
    data = bytearray((llama_art / "model.safetensors").read_bytes())
    data[-1] ^= 1
    (llama_art / "model.safetensors").write_bytes(bytes(data))
    rc, err = _cli(capsys, "eval", llama_art)
    assert rc == 2 and "SHA-256" in err and loaded == [], err


def test_recorded_source_paths_must_be_absolute(art):
    m = _manifest(art)
    m["source"] = {"type": "hf-folder", "path": "relative/folder"}
    _write_manifest(art, m)
    with pytest.raises(InputError, match=r"'relative/folder'.*absolute"):
        load(art)


# ---- the manifest itself (items 6 and 11) ---------------------------------------------------------------------


def test_deeply_nested_manifest(art, capsys):
    (art / "manifest.json").write_text('{"format": "lowbit-quantized", "extra": ' + "[" * 100_000 + "]" * 100_000 + "}")
    with pytest.raises(CorruptFileError, match=r"manifest\.json: JSON nested too deeply"):
        load(art, model=seeded(TextNet))
    _assert_cli_refuses(capsys, art, "manifest.json", "nested too deeply")


def test_huge_manifest_is_not_read(art, monkeypatch):
    import lowbit.io.manifest as mf

    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 100)
    with pytest.raises(CorruptFileError, match=r"manifest\.json: \d+ bytes, more than a manifest can be"):
        load(art, model=seeded(TextNet))


@pytest.mark.parametrize("where", ["record", "config", "spec"])
def test_unknown_key_inside_a_layer_record(art, where):
    m = _manifest(art)
    rec = m["layers"]["up"]
    {"record": rec, "config": rec["config"], "spec": rec["spec"]}[where]["surprise"] = 1
    _write_manifest(art, m)
    with pytest.raises(CorruptFileError, match=r"manifest\.json: layer 'up' has a bad record .*surprise"):
        load(art, model=seeded(TextNet))


@pytest.mark.parametrize("name", ["model.safetensors", "manifest.json"])
def test_symlinked_files_are_refused(art, tmp_path, name):
    outside = tmp_path / f"outside-{name}"
    os.replace(art / name, outside)
    os.symlink(outside, art / name)
    with pytest.raises(CorruptFileError, match=rf"{name}: is a symbolic link"):
        load(art, model=seeded(TextNet))


def test_weights_file_that_is_a_fifo(art):
    (art / "model.safetensors").unlink()
    os.mkfifo(art / "model.safetensors")
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: not a regular file"):
        load(art, model=seeded(TextNet))


# ---- quantize-side checks of the same families (items 7 and 9) -------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_a_bias(bad):
    model = seeded(TextNet)
    with torch.no_grad():
        model.up.bias[3] = bad
    with pytest.raises(InputError, match=r"module 'up': bias \(80,\) holds 1 NaN/Inf"):
        lowbit.quantize(model, lowbit.QuantPlan.uniform("int8", skip=()), progress=False)
    assert isinstance(model.up, torch.nn.Linear)  # unchanged


@pytest.mark.parametrize("scheme", ["int4-g32-asym", "int8"])
@pytest.mark.parametrize("magnitude, word", [(1e-6, "underflow"), (1e7, "overflow")])
def test_scales_outside_fp16_move_to_fp32(scheme, magnitude, word, caplog, tmp_path):
    """fp16 scales would zero a layer of ~1e-6 weights or saturate one of ~1e7; lowbit widens that layer's
    scales to fp32, says so, and the error is then what the element format gives at normal magnitudes."""
    model = seeded(TextNet)
    with torch.no_grad():
        model.up.weight.mul_(magnitude / model.up.weight.abs().max())
    w = model.up.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="lowbit.quantizer"):
        lowbit.quantize(model, lowbit.QuantPlan.uniform(scheme, skip=()), progress=False)
    assert model.up.spec.scale_format == "fp32" and model.down.spec.scale_format == "fp16"
    assert f"module 'up': scales" in caplog.text and word in caplog.text and "fp32" in caplog.text
    rel = float((model.up.dequantized_weight() - w).norm() / w.norm())
    assert rel < (0.1 if scheme.startswith("int4") else 0.01), rel
    reloaded = load(save(model, tmp_path / "a"), model=seeded(TextNet))
    assert reloaded.up.spec.scale_format == "fp32"
    assert torch.equal(reloaded.up.dequantized_weight(), model.up.dequantized_weight())


def test_scales_with_no_wider_storage_are_refused():
    """e8m0 (MX) scales hold 2^-127 .. 2^127; weights near 1e-39 cannot be stored: refused, naming the layer."""
    model = seeded(TextNet)
    with torch.no_grad():
        model.up.weight.mul_(1e-39 / model.up.weight.abs().max())
    with pytest.raises(InputError, match=r"module 'up': scales down to .* underflow e8m0.*no wider scale storage"):
        lowbit.quantize(model, lowbit.QuantPlan.uniform("mxfp4", skip=()), progress=False)


def test_near_dead_channels_do_not_widen_a_layer(caplog):
    """A few channels of ~1e-11 (as in trained CNNs) hold no energy: fp16 scales stay, nothing is logged."""
    model = seeded(TextNet)
    with torch.no_grad():
        model.up.weight[:3].mul_(1e-11)
    with caplog.at_level(logging.WARNING, logger="lowbit.quantizer"):
        lowbit.quantize(model, lowbit.QuantPlan.uniform("int8", skip=()), progress=False)
    assert model.up.spec.scale_format == "fp16" and "underflow" not in caplog.text

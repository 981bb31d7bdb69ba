"""Damaged or foreign folders fail with a clear error of the right class that names the file."""

from __future__ import annotations

import json

import pytest

from io_models import TextNet, quantized, seeded
from lowbit.errors import CorruptFileError, InputError
from lowbit.io import load, read_manifest, save


@pytest.fixture
def art(tmp_path):
    """Path of TextNet quantized to int4-g64-asym, saved without a source."""
    return save(quantized(TextNet, "int4-g64-asym"), tmp_path / "art")


def _load(path):
    return load(path, model=seeded(TextNet))


def _edit_manifest(path, change):
    m = json.loads((path / "manifest.json").read_text())
    change(m)
    (path / "manifest.json").write_text(json.dumps(m))


def test_truncated_weights(art):
    f = art / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: truncated: \d+ bytes, manifest\.json records"):
        _load(art)


def test_flipped_byte_fails_the_checksum(art):
    f = art / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0x01
    f.write_bytes(bytes(data))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: SHA-256 .* differs"):
        _load(art)


def test_deleted_weights(art):
    (art / "model.safetensors").unlink()
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: listed in manifest\.json but missing"):
        _load(art)


def test_missing_manifest_is_not_an_artifact(art):
    (art / "manifest.json").unlink()
    with pytest.raises(CorruptFileError, match=r"not a lowbit artifact \(no manifest\.json\)"):
        _load(art)


def test_invalid_json(art):
    (art / "manifest.json").write_text('{"format": "lowbit-quantized", ')
    with pytest.raises(CorruptFileError, match=r"manifest\.json: not valid JSON"):
        read_manifest(art)


def test_newer_format_version_asks_to_upgrade(art):
    _edit_manifest(art, lambda m: m.update(format_version=2))
    with pytest.raises(InputError, match=r"manifest\.json: format_version 2 .* upgrade lowbit"):
        _load(art)


@pytest.mark.parametrize("version", [0, "1", None, True])
def test_bad_format_version(art, version):
    _edit_manifest(art, lambda m: m.update(format_version=version))
    with pytest.raises(CorruptFileError, match=r"format_version .* is not a positive integer"):
        read_manifest(art)


def test_wrong_format(art):
    _edit_manifest(art, lambda m: m.update(format="something-else"))
    with pytest.raises(CorruptFileError, match=r"format is 'something-else', expected 'lowbit-quantized'"):
        read_manifest(art)


def test_unknown_and_missing_keys(art):
    _edit_manifest(art, lambda m: (m.update(surprise=1), m.pop("layers")))
    with pytest.raises(CorruptFileError, match=r"missing key\(s\) \['layers'\] and unknown key\(s\) \['surprise'\]"):
        read_manifest(art)


def test_files_entry_outside_the_folder(art):
    _edit_manifest(art, lambda m: m["files"].update({"../x": {"bytes": 0, "sha256": "0" * 64}}))
    with pytest.raises(CorruptFileError, match=r"'\.\./x', which is not a plain file name"):
        read_manifest(art)


def test_bad_layer_record(art):
    _edit_manifest(art, lambda m: m["layers"]["up"].update(type="QuantMystery"))
    with pytest.raises(CorruptFileError, match=r"layer 'up' has a bad record .*QuantMystery"):
        _load(art)


def test_consistent_but_foreign_weights_file(art):
    """A non-safetensors file whose checksum was updated too: still refused, by the reader."""
    f = art / "model.safetensors"
    f.write_bytes(b"\x80\x04not safetensors at all")
    from lowbit.io.manifest import file_entry

    _edit_manifest(art, lambda m: m["files"].update({"model.safetensors": file_entry(f)}))
    with pytest.raises(CorruptFileError, match=r"model\.safetensors: not a readable safetensors file"):
        _load(art)


def test_folder_that_is_not_an_artifact(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CorruptFileError, match=r"not a lowbit artifact"):
        load(tmp_path, model=seeded(TextNet))


def test_missing_path(tmp_path):
    with pytest.raises(InputError, match=r"nope: no such folder") as e:
        load(tmp_path / "nope", model=seeded(TextNet))
    assert not isinstance(e.value, CorruptFileError)


def test_file_instead_of_folder(art):
    with pytest.raises(InputError, match=r"model\.safetensors: is a file.*pass the folder"):
        load(art / "model.safetensors", model=seeded(TextNet))

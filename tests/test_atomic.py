"""Writes are atomic, destinations are checked before writing, and the files are JSON + safetensors only."""

from __future__ import annotations

import hashlib
import json
import struct

import pytest
import safetensors.torch
import torch

import lowbit
from io_models import TextNet, quantized, seeded, text_input
from lowbit.errors import InputError
from lowbit import atomic
from lowbit.io import load, save


def _snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _siblings(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def _failing_writer(tensors, filename, metadata=None):
    with open(filename, "wb") as fh:  # half a file, then the failure
        fh.write(b"\0" * 1000)
    raise OSError("disk full (simulated)")


def test_failure_while_writing_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer)
    with pytest.raises(InputError, match="could not write .*disk full"):
        save(quantized(TextNet, "int8"), tmp_path / "art")
    assert _siblings(tmp_path) == []  # no output folder, no temporary folder


def test_failure_while_replacing_keeps_the_previous_artifact(tmp_path, monkeypatch):
    old_model = quantized(TextNet, "int8")
    path = save(old_model, tmp_path / "art")
    before = _snapshot(path)
    monkeypatch.setattr(safetensors.torch, "save_file", _failing_writer)
    with pytest.raises(InputError, match="could not write .*disk full"):
        save(quantized(TextNet, "int4-g64-asym"), path, overwrite=True)
    assert _siblings(tmp_path) == ["art"] and _snapshot(path) == before
    monkeypatch.undo()
    x = text_input()
    assert torch.equal(load(path, model=seeded(TextNet))(x), old_model(x))


def test_failed_final_rename_puts_the_previous_artifact_back(tmp_path, monkeypatch):
    path = save(quantized(TextNet, "int8"), tmp_path / "art")
    before = _snapshot(path)
    real_rename, calls = atomic._rename, []

    def rename(src, dst):  # move the old folder aside, then fail to move the new one in
        calls.append((src.name, dst.name))
        if len(calls) == 2:
            raise OSError("rename failed (simulated)")
        real_rename(src, dst)

    monkeypatch.setattr(atomic, "_rename", rename)
    with pytest.raises(InputError, match="could not write .*rename failed"):
        save(quantized(TextNet, "int4-g64-asym"), path, overwrite=True)
    assert _siblings(tmp_path) == ["art"] and _snapshot(path) == before


def test_overwrite_replaces_an_artifact(tmp_path):
    path = save(quantized(TextNet, "int8"), tmp_path / "art")
    with pytest.raises(InputError, match=r"already holds a lowbit artifact; pass overwrite=True"):
        save(quantized(TextNet, "nf4"), path)
    new = quantized(TextNet, "nf4")
    assert save(new, path, overwrite=True) == path
    assert _siblings(tmp_path) == ["art"]
    assert lowbit.io.read_manifest(path)["layers"]["up"]["spec"]["format"] == "nf4"


def test_a_foreign_folder_is_never_replaced(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"mine is a folder with other files \(thesis\.tex\) and not a lowbit"):
            save(quantized(TextNet, "int8"), target, overwrite=overwrite)
    assert (target / "thesis.tex").read_text() == "years of work"
    assert _siblings(tmp_path) == ["mine"]


def test_an_artifact_with_foreign_files_is_not_replaced(tmp_path):
    path = save(quantized(TextNet, "int8"), tmp_path / "art")
    (path / "README.md").write_text("my notes")
    with pytest.raises(InputError, match=r"files lowbit did not write \(README\.md\)"):
        save(quantized(TextNet, "int8"), path, overwrite=True)
    assert (path / "README.md").exists()


def test_empty_folder_new_parents_and_files(tmp_path):
    (tmp_path / "empty").mkdir()
    save(quantized(TextNet, "int8"), tmp_path / "empty")
    save(quantized(TextNet, "int8"), tmp_path / "a" / "b" / "c")
    assert (tmp_path / "a" / "b" / "c" / "manifest.json").is_file()
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match=r"file exists and is a file"):
        save(quantized(TextNet, "int8"), tmp_path / "file")


def test_unserializable_extra_writes_nothing(tmp_path):
    with pytest.raises(InputError, match=r"extra is not JSON-serializable"):
        save(quantized(TextNet, "int8"), tmp_path / "art", extra={"when": object()})
    with pytest.raises(InputError, match=r"extra is not JSON-serializable"):
        save(quantized(TextNet, "int8"), tmp_path / "art", extra={"x": float("nan")})
    assert _siblings(tmp_path) == []


def test_only_json_and_safetensors_are_written(tmp_path):
    model = quantized(TextNet, "int4-g64-asym")
    path = save(model, tmp_path / "art")
    assert sorted(p.name for p in path.iterdir()) == ["manifest.json", "model.safetensors"]
    manifest = json.loads((path / "manifest.json").read_text(encoding="utf-8"))  # plain JSON
    data = (path / "model.safetensors").read_bytes()
    assert not data.startswith((b"PK", b"\x80"))  # not a torch zip archive, not a pickle stream
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8 : 8 + n])  # safetensors: u64 length, JSON header, raw tensor bytes
    ends = [t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"]
    assert 8 + n + max(ends) == len(data)  # the header's tensors cover the whole rest of the file
    assert set(header) - {"__metadata__"} == set(model.state_dict())
    entry = manifest["files"]["model.safetensors"]
    assert entry == {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    assert manifest["size"]["total_bytes"] == max(ends)  # every tensor byte is counted by the size report


def test_non_tensor_extra_state_is_refused_not_pickled(tmp_path):
    class WithExtra(torch.nn.Linear):
        def get_extra_state(self):
            return {"calibrated": True}

        def set_extra_state(self, state):
            pass

    model = torch.nn.Sequential(WithExtra(4, 4))
    with pytest.raises(InputError, match=r"'0._extra_state' .* never pickle"):
        save(model, tmp_path / "art")
    assert _siblings(tmp_path) == []

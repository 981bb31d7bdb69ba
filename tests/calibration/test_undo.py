"""The undo store's temporary folders: owned by their process, swept once that process is gone."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys

import pytest
import torch
from torch import nn

from lowbit.calibration.undo import OWNER, PREFIX, UndoStore, remove_stale_folders

posix_only = pytest.mark.skipif(os.name != "posix", reason="process liveness is checked with POSIX signals")


def _folder(root, name: str, pid: int | None, size: int = 1000):
    folder = root / f"{PREFIX}{name}"
    folder.mkdir()
    (folder / "block0-7.safetensors").write_bytes(b"\0" * size)
    if pid is not None:
        (folder / OWNER).write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    return folder


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


@posix_only
def test_folders_of_dead_processes_are_removed_and_logged(tmp_path, caplog):
    dead = _folder(tmp_path, "dead", _dead_pid(), size=3 * 2**20)
    alive = _folder(tmp_path, "alive", os.getppid())
    mine = _folder(tmp_path, "mine", os.getpid())
    unowned = _folder(tmp_path, "unowned", None)
    other_host = _folder(tmp_path, "elsewhere", None)
    (other_host / OWNER).write_text(json.dumps({"pid": _dead_pid(), "host": "not-" + socket.gethostname()}))
    with caplog.at_level(logging.INFO):
        assert remove_stale_folders(tmp_path) == [dead]
    assert not dead.exists() and alive.exists() and mine.exists() and unowned.exists() and other_host.exists()
    assert str(dead) in caplog.text and "3.0 MB" in caplog.text


def test_the_undo_folder_names_its_owner_and_is_deleted_on_close(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    model = nn.Sequential(nn.Linear(4, 4))
    store = UndoStore(model)
    store.keep("0", model[0])
    model[0] = nn.Identity()  # replaced: its weights are only needed for undo
    store.offload(["0"], "block0")
    (folder,) = tmp_path.iterdir()
    assert folder.name.startswith(PREFIX)
    assert json.loads((folder / OWNER).read_text()) == {"pid": os.getpid(), "host": socket.gethostname()}
    store.restore()
    assert isinstance(model[0], nn.Linear) and model[0].weight.shape == torch.Size([4, 4])
    store.close()
    assert list(tmp_path.iterdir()) == []


@posix_only
def test_a_block_by_block_run_sweeps_the_folders_killed_runs_left(tmp_path, monkeypatch):
    from lowbit import QuantPlan, quantize
    from lowbit.models import tiny

    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    left = _folder(tmp_path, "killed", _dead_pid())
    ids = torch.randint(3, 256, (4, 16), generator=torch.Generator().manual_seed(0))
    quantize(tiny.tiny_llama(), QuantPlan.uniform("int4-g32-asym", "gptq"), ids, progress=False)
    assert not left.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(PREFIX)]

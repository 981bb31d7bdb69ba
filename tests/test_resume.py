"""Resumable quantization: a run stopped after some blocks (by an exception, or a real SIGKILL) and started
again reuses the finished blocks, verified, and writes the same artifact byte for byte
(``lowbit.calibration.checkpoint``; the command line's ``.NAME.lowbit-resume`` folder next to ``--out``)."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import lowbit
import lowbit.quantizer as quantizer_module
from lowbit.calibration.checkpoint import INDEX, BlockCheckpoint, resume_folder
from lowbit.cli import main
from lowbit.errors import InputError
from lowbit.io import MANIFEST, WEIGHTS
from lowbit.models import tiny
from lowbit.plan import QuantPlan

GPTQ = QuantPlan.uniform("int4-g32-asym", "gptq")
BLOCK0, BLOCK1 = "model.layers.0.", "model.layers.1."
CLI = ["quantize", "tiny-llama", "--scheme", "int4-g32-asym", "--method", "gptq", "--calib-samples", "8",
       "--calib-len", "64"]


def _ids(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 256, (n, 32), generator=torch.Generator().manual_seed(seed))


def _files(folder: Path) -> dict[str, bytes]:
    return {name: (folder / name).read_bytes() for name in (WEIGHTS, MANIFEST)}


def _artifact(model: torch.nn.Module, path: Path, plan: QuantPlan = GPTQ) -> dict[str, bytes]:
    return _files(lowbit.save(model, path, plan=plan))


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, bytes]:
    """The files of an uninterrupted GPTQ run without a checkpoint."""
    model = quantizer_module.quantize(tiny.tiny_llama(), GPTQ, _ids(), progress=False)
    return _artifact(model, tmp_path_factory.mktemp("ref") / "art")


@pytest.fixture
def solved(monkeypatch) -> list[str]:
    """The names of the modules solved (converted from float) in this test, in order."""
    names: list[str] = []
    real = quantizer_module._convert
    monkeypatch.setattr(quantizer_module, "_convert", lambda t, s: names.append(t.name) or real(t, s))
    return names


def _interrupt_in_block_1(monkeypatch) -> None:
    """Stop the run (as Ctrl-C would) while block 1 is being solved: block 0 is finished and saved."""
    real = quantizer_module._convert

    def convert(t, s):
        if t.name.startswith(BLOCK1):
            raise KeyboardInterrupt
        return real(t, s)

    monkeypatch.setattr(quantizer_module, "_convert", convert)


def test_an_interrupted_run_resumes_from_its_finished_blocks(tmp_path, monkeypatch, caplog, reference):
    ckpt = tmp_path / "ckpt"
    with monkeypatch.context() as m:
        _interrupt_in_block_1(m)
        with pytest.raises(KeyboardInterrupt):
            quantizer_module.quantize(tiny.tiny_llama(), GPTQ, _ids(), progress=False, checkpoint=ckpt)
    assert [b["name"] for b in json.loads((ckpt / INDEX).read_text())["blocks"]] == ["model.layers.0"]

    solved: list[str] = []
    real = quantizer_module._convert
    monkeypatch.setattr(quantizer_module, "_convert", lambda t, s: solved.append(t.name) or real(t, s))
    with caplog.at_level(logging.INFO):
        model = quantizer_module.quantize(tiny.tiny_llama(), GPTQ, _ids(), progress=False, checkpoint=ckpt)
    assert f"resuming from 1 finished block(s) in {ckpt}" in caplog.text
    assert solved and all(n.startswith(BLOCK1) for n in solved)  # block 0 was not solved again
    assert _artifact(model, tmp_path / "art") == reference


def test_a_killed_command_resumes_and_writes_the_same_artifact(tmp_path, capsys, caplog):
    """SIGKILL a real `lowbit quantize` once block 0 is on disk (block 1 made to wait), run it again."""
    out = tmp_path / "art"
    script = textwrap.dedent(f"""
        import time
        from lowbit.calibration.checkpoint import BlockCheckpoint
        from lowbit.cli import main
        real = BlockCheckpoint.save
        def save(self, i, block):
            real(self, i, block)
            time.sleep(600)  # block 0 is saved: wait here to be killed
        BlockCheckpoint.save = save
        main({[*CLI, "--out", str(out)]!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    index = resume_folder(out) / INDEX
    try:
        deadline = time.monotonic() + 120
        while not index.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert index.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no checkpoint in 120 s"
    finally:
        proc.kill()  # SIGKILL: no cleanup runs
        proc.wait()
    assert not out.exists()

    with caplog.at_level(logging.INFO):
        assert main([*CLI, "--out", str(out)]) == 0
    assert f"resuming from 1 finished block(s) in {resume_folder(out)}" in caplog.text
    assert "block 1/2 (model.layers.0): reused from the checkpoint" in caplog.text
    assert "block 2/2 (model.layers.1): 7 module(s) observed" in caplog.text
    assert not resume_folder(out).exists()  # deleted once the artifact is saved
    assert main([*CLI, "--out", str(tmp_path / "ref")]) == 0  # uninterrupted
    assert not resume_folder(tmp_path / "ref").exists()
    assert _files(out) == _files(tmp_path / "ref")


def test_a_tampered_block_file_is_detected_and_solved_again(tmp_path, caplog, solved, reference):
    ckpt = tmp_path / "ckpt"
    quantizer_module.quantize(tiny.tiny_llama(), GPTQ, _ids(), progress=False, checkpoint=ckpt)
    block1 = ckpt / "block-00001.safetensors"
    data = bytearray(block1.read_bytes())
    data[-1] ^= 0x01  # one bit of the last tensor
    block1.write_bytes(bytes(data))
    solved.clear()
    with caplog.at_level(logging.INFO):
        model = quantizer_module.quantize(tiny.tiny_llama(), GPTQ, _ids(), progress=False, checkpoint=ckpt)
    assert "discarding block 1 and later ones" in caplog.text and "SHA-256 differs" in caplog.text
    assert "resuming from 1 finished block(s)" in caplog.text
    assert solved and all(n.startswith(BLOCK1) for n in solved)
    assert _artifact(model, tmp_path / "art") == reference


def test_a_block_that_does_not_fit_the_model_is_not_used(tmp_path, caplog):
    """A file with a valid checksum but modules of other shapes (the index rewritten to match it)."""
    ckpt = tmp_path / "ckpt"
    parts = {"anything": "same"}
    layout = [("model.layers.0", [f"model.layers.0.mlp.{p}_proj" for p in ("gate", "up", "down")])]
    small = tiny.tiny_llama()
    quantizer_module.quantize(small, QuantPlan.uniform("int4-g32-asym"), progress=False)
    BlockCheckpoint(ckpt, parts, layout).save(0, small.model.layers[0])
    other = tiny.tiny_llama()
    other.model.layers[0].mlp.down_proj = torch.nn.Linear(128, 32)  # another shape than the stored one
    with caplog.at_level(logging.INFO):
        assert BlockCheckpoint(ckpt, parts, layout).restore(0, other.model.layers[0]) is None
    assert "does not fit" in caplog.text and not (ckpt / "block-00000.safetensors").exists()


def test_a_checkpoint_made_with_another_plan_is_discarded(tmp_path, caplog, solved):
    ckpt = tmp_path / "ckpt"
    quantizer_module.quantize(tiny.tiny_llama(), GPTQ, _ids(), progress=False, checkpoint=ckpt)
    solved.clear()
    other = QuantPlan.uniform("int4-g64-asym", "gptq")
    with caplog.at_level(logging.INFO):
        model = quantizer_module.quantize(tiny.tiny_llama(), other, _ids(), progress=False, checkpoint=ckpt)
    assert f"discarding the checkpoint in {ckpt}: it was made by another run (plan differ)" in caplog.text
    assert "resuming" not in caplog.text
    assert any(n.startswith(BLOCK0) for n in solved) and any(n.startswith(BLOCK1) for n in solved)
    fresh = quantizer_module.quantize(tiny.tiny_llama(), other, _ids(), progress=False)
    assert _artifact(model, tmp_path / "a", other) == _artifact(fresh, tmp_path / "b", other)


def test_other_calibration_data_invalidates_the_checkpoint(tmp_path, caplog, solved):
    ckpt = tmp_path / "ckpt"
    quantizer_module.quantize(tiny.tiny_llama(), GPTQ, _ids(), progress=False, checkpoint=ckpt)
    with caplog.at_level(logging.INFO):
        quantizer_module.quantize(tiny.tiny_llama(), GPTQ, _ids(seed=1), progress=False, checkpoint=ckpt)
    assert "(calibration data differ)" in caplog.text and "resuming" not in caplog.text


def test_a_folder_with_other_files_is_refused_and_left_alone(tmp_path):
    ckpt = tmp_path / "mine"
    ckpt.mkdir()
    (ckpt / "notes.txt").write_text("keep me")
    model = tiny.tiny_llama()
    with pytest.raises(InputError, match="notes.txt"):
        quantizer_module.quantize(model, GPTQ, _ids(), progress=False, checkpoint=ckpt)
    assert (ckpt / "notes.txt").read_text() == "keep me"


def test_one_shot_data_cannot_be_resumed(tmp_path):
    with pytest.raises(InputError, match="read twice"):
        quantizer_module.quantize(tiny.tiny_llama(), GPTQ, iter([_ids()]), progress=False, checkpoint=tmp_path / "c")


def test_a_failed_command_removes_its_resume_folder(tmp_path, capsys, monkeypatch):
    """An InputError after blocks were saved (here: from save) leaves nothing next to --out."""
    parent = tmp_path / "outputs"
    parent.mkdir()

    def refuse(*args, **kwargs):
        assert resume_folder(parent / "art").is_dir()  # the blocks were kept until now
        raise InputError("disk says no")

    monkeypatch.setattr(lowbit, "save", refuse)
    assert main([*CLI, "--out", str(parent / "art")]) == 2
    assert "disk says no" in capsys.readouterr().err
    assert list(parent.iterdir()) == []


def test_an_interrupted_command_keeps_its_blocks_and_no_resume_starts_over(tmp_path, caplog, monkeypatch, solved):
    out = tmp_path / "art"
    with monkeypatch.context() as m:
        m.setattr(lowbit, "save", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
        with caplog.at_level(logging.INFO):
            assert main([*CLI, "--out", str(out)]) == 130
    assert f"the finished blocks are kept in {resume_folder(out)}" in caplog.text
    assert len(json.loads((resume_folder(out) / INDEX).read_text())["blocks"]) == 2
    solved.clear()
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert main([*CLI, "--out", str(out), "--no-resume"]) == 0
    assert "resuming" not in caplog.text
    assert any(n.startswith(BLOCK0) for n in solved) and any(n.startswith(BLOCK1) for n in solved)
    assert not resume_folder(out).exists() and (out / MANIFEST).exists()

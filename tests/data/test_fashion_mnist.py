"""Fashion-MNIST: the IDX reader (real and damaged files), the splits, calibration images."""

from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch

from lowbit.data import fashion_mnist as fm
from lowbit.errors import InputError


def _idx(path, array: np.ndarray, *, gz: bool = True, header: bytes | None = None) -> None:
    head = header if header is not None else bytes([0, 0, 8, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    raw = head + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


def test_read_idx_reads_what_was_written(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    _idx(tmp_path / "x-idx3-ubyte.gz", a)
    _idx(tmp_path / "x-idx3-ubyte", a, gz=False)
    assert np.array_equal(fm.read_idx(tmp_path / "x-idx3-ubyte.gz"), a)
    assert np.array_equal(fm.read_idx(tmp_path / "x-idx3-ubyte"), a)


@pytest.mark.parametrize("damage, message", [
    ("truncated", "truncated or corrupt"),
    ("magic", "not an IDX file"),
    ("type", "IDX type 0x0d"),
    ("gzip", "cannot read it"),
    ("missing", "missing"),
])
def test_damaged_idx_files_are_refused_by_name(tmp_path, damage, message):
    a = np.ones((3, 2), dtype=np.uint8)
    p = tmp_path / "y.gz"
    if damage == "truncated":
        p.write_bytes(gzip.compress((bytes([0, 0, 8, 2]) + (3).to_bytes(4, "big") + (2).to_bytes(4, "big")) + b"\1" * 5))
    elif damage == "magic":
        _idx(p, a, header=bytes([1, 0, 8, 2]) + (3).to_bytes(4, "big") + (2).to_bytes(4, "big"))
    elif damage == "type":
        _idx(p, a, header=bytes([0, 0, 0x0D, 2]) + (3).to_bytes(4, "big") + (2).to_bytes(4, "big"))
    elif damage == "gzip":
        p.write_bytes(b"\x1f\x8b not really gzip")
    with pytest.raises(InputError, match=message) as e:
        fm.read_idx(p)
    assert str(p) in str(e.value)


def test_a_missing_data_set_names_where_it_looked_and_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv(fm.FOLDER_ENV, str(tmp_path))
    monkeypatch.setattr(fm.sys, "prefix", str(tmp_path / "venv"))
    monkeypatch.setattr(fm, "SYSTEM_FOLDER", tmp_path / "nowhere")
    with pytest.raises(InputError, match="make install") as e:
        fm.fashion_mnist_folder()
    assert str(tmp_path / "nowhere") in str(e.value)


def test_the_folder_from_the_environment_is_used(tmp_path, monkeypatch):
    for name in fm.FILES["test"]:
        (tmp_path / name).write_bytes(b"")
    monkeypatch.setenv(fm.FOLDER_ENV, str(tmp_path))
    assert fm.fashion_mnist_folder() == tmp_path


def test_the_real_splits_are_complete_and_balanced():
    x, y = fm.fashion_mnist("test")
    assert x.shape == (10_000, 28, 28) and x.dtype == torch.uint8
    assert torch.equal(y.bincount(), torch.full((10,), 1_000))
    with pytest.raises(InputError, match="splits 'train' and 'test'"):
        fm.fashion_mnist("validation")


def test_inputs_are_normalized_and_calibration_is_seeded_training_images():
    x, _ = fm.fashion_mnist("train")
    inputs = fm.to_inputs(x[:1000])
    assert inputs.shape == (1000, 1, 28, 28)
    assert abs(float(inputs.mean())) < 0.1 and abs(float(inputs.std()) - 1) < 0.1
    a, b = fm.calibration_images(16, seed=3), fm.calibration_images(16, seed=3)
    assert torch.equal(a, b) and not torch.equal(a, fm.calibration_images(16, seed=4))
    with pytest.raises(InputError, match="1 to 60000"):
        fm.calibration_images(0)
    with pytest.raises(InputError, match="uint8"):
        fm.to_inputs(inputs)

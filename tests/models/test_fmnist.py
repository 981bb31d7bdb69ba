"""The Fashion-MNIST models: architectures, training learns, the cache is reused and rebuilt when damaged,
and the CLI reports true accuracy."""

from __future__ import annotations

import pytest
import torch

from lowbit.cli import main
from lowbit.models import dataset_of, fmnist, load_model


@pytest.mark.parametrize("name", list(fmnist.RECIPES))
def test_architectures_give_ten_logits_and_skeletons_are_seeded(name):
    a, b = fmnist.skeleton(name), fmnist.skeleton(name)
    x = torch.randn(3, 1, 28, 28)
    assert a(x).shape == (3, 10)
    assert torch.equal(a(x), b(x))
    assert dataset_of(name) == "fashion-mnist" and dataset_of("tiny-cnn") is None


def test_a_short_training_learns_far_beyond_chance():
    model, acc = fmnist.train("fmnist-resnet", subset=4096, epochs=2, progress=False, test_limit=2000)
    assert not model.training
    assert acc > 0.5  # 10 classes: chance is 0.1
    assert acc == fmnist.test_accuracy(model, limit=2000)


@pytest.fixture
def quick_training(monkeypatch, tmp_path):
    """Training replaced by a short real one (512 images, one epoch, accuracy on 500 test images) and the cache
    moved to tmp_path."""
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    calls = []
    real = fmnist.train

    def short(name, **kw):
        calls.append(name)
        return real(name, subset=512, epochs=1, progress=False, test_limit=500)

    monkeypatch.setattr(fmnist, "train", short)
    return calls


def test_trained_weights_are_cached_and_a_damaged_file_is_trained_again(quick_training, caplog):
    model, acc = fmnist.trained("fmnist-resnet")
    again, acc2 = fmnist.trained("fmnist-resnet")
    assert quick_training == ["fmnist-resnet"] and acc2 == acc
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(), again.state_dict().values()))
    fmnist.weights_path("fmnist-resnet").write_bytes(b"not safetensors")
    fmnist.trained("fmnist-resnet")
    assert quick_training == ["fmnist-resnet"] * 2
    assert "unreadable" in caplog.text


def test_cli_reports_true_accuracy_before_and_after_quantization(quick_training, tmp_path, capsys):
    float_acc = fmnist.test_accuracy(fmnist.trained("fmnist-resnet")[0])  # over all 10,000 test images
    assert main(["eval", "fmnist-resnet"]) == 0
    assert f"top-1 accuracy {100 * float_acc:.2f}%" in capsys.readouterr().out
    out = tmp_path / "q"
    assert main(["quantize", "fmnist-resnet", "--scheme", "int8", "--act", "int8", "--out", str(out)]) == 0
    assert "Fashion-MNIST" not in capsys.readouterr().err
    assert main(["eval", str(out), "--views", "2000"]) == 0
    text = capsys.readouterr().out
    assert "2,000 images: top-1 accuracy" in text and "agreement with float: top-1" in text
    assert main(["quantize", "fmnist-resnet", "--scheme", "int8", "--act", "int8", "--calib-data", str(tmp_path),
                 "--out", str(tmp_path / "r")]) == 2
    assert load_model("fmnist-resnet").kind == "image-classifier"

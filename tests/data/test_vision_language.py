"""Images with a prompt for vision-language models: reading a folder of images, laying out the prompt with the
processor, extending it by the float model's own answer, and the CLI's --calib-data / --data / --prompt."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from lowbit.data.teacher import continuation_batches
from lowbit.data.vision_language import image_folder, prompt_text, vision_language_inputs
from lowbit.errors import InputError
from lowbit.models.tiny import tiny_hf, tiny_llava_processor


def _images(folder, n=5):
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    for i in range(n):  # odd sizes: the processor resizes and crops them
        Image.fromarray(g.integers(0, 256, (40 + 8 * i, 56, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def _vlm_folder(tmp_path):
    folder = tmp_path / "llava"
    tiny_hf("llava").save_pretrained(folder, safe_serialization=True)
    tiny_llava_processor().save_pretrained(folder)
    return folder


def test_image_folder_reads_sorted_rgb_and_refuses_bad_folders(tmp_path):
    folder = _images(tmp_path / "imgs", 3)
    Image.fromarray(np.zeros((8, 8), dtype=np.uint8)).save(folder / "grey.jpg")  # greyscale becomes RGB
    got = image_folder(folder)
    assert [p.name for p, _ in got] == ["grey.jpg", "im0.png", "im1.png", "im2.png"]
    assert all(im.mode == "RGB" for _, im in got) and len(image_folder(folder, 2)) == 2
    with pytest.raises(InputError, match="no such folder"):
        image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image file"):
        image_folder(tmp_path / "empty")
    (folder / "broken.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match=r"broken.png: not a readable image"):
        image_folder(folder)


def test_prompt_goes_through_the_chat_template_or_after_the_image_token():
    processor = tiny_llava_processor()
    assert prompt_text(processor, "What is it?") == "user: <image>What is it?\nassistant: "
    processor.chat_template = None
    assert prompt_text(processor, "What is it?") == "<image>\nWhat is it?"
    with pytest.raises(InputError, match="empty"):
        prompt_text(processor, "  ")


def test_continuation_scores_the_float_models_answer(tmp_path):
    model = tiny_hf("llava")
    images = image_folder(_images(tmp_path / "imgs", 2))
    prompts = vision_language_inputs(tiny_llava_processor(), images, "What is it?")
    assert (prompts[0]["input_ids"] == model.config.image_token_id).sum() == 16  # one token per patch
    batches = continuation_batches(model, prompts, new_tokens=6)
    for p, b in zip(prompts, batches):
        n = p["input_ids"].shape[1]
        assert torch.equal(b["input_ids"][:, :n], p["input_ids"]) and torch.equal(b["pixel_values"], p["pixel_values"])
        new = b["input_ids"].shape[1] - n
        assert 1 <= new <= 6 and b["attention_mask"].shape == b["input_ids"].shape
        assert b["score_mask"].sum() == new and b["score_mask"][0, n - 1:n - 1 + new].all()
        with torch.no_grad():  # the scored positions' argmax is the float model's own answer
            logits = model(**{k: v for k, v in b.items() if k != "score_mask"}).logits
        assert torch.equal(logits[0, n - 1:-1].argmax(-1), b["input_ids"][0, n:])


def _cli(capsys, *argv):
    from lowbit.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_vision_language_model_through_the_cli(tmp_path, capsys):
    folder, images = _vlm_folder(tmp_path), _images(tmp_path / "imgs")
    rc, _, err = _cli(capsys, "quantize", folder, "--scheme", "int4-g32-asym", "--method", "gptq",
                      "--out", tmp_path / "none")
    assert rc == 2 and "pass --calib-data FOLDER of images" in err and not (tmp_path / "none").exists()
    rc, out, err = _cli(capsys, "quantize", folder, "--scheme", "int4-g32-asym", "--method", "gptq",
                        "--calib-data", images, "--prompt", "What is shown?", "--calib-len", "8", "--out", tmp_path / "q")
    assert rc == 0, err
    assert "5 images with the prompt 'What is shown?', answered by the float model" in out
    schedule = json.loads((tmp_path / "q" / "manifest.json").read_text())["extra"]["calibration"]["schedule"]
    stacks = [s["stack"] for s in schedule if "stack" in s]
    assert stacks == ["model.vision_tower.encoder.layers", "model.language_model.layers"]
    rc, out, err = _cli(capsys, "eval", tmp_path / "q", "--data", images, "--new-tokens", "8")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if "token KL" in ln)
    assert "5 image(s)" in line and "'Describe this image.'" in line
    assert float(line.split("token KL(float||model) ")[1].split()[0]) > 0
    rc, _, err = _cli(capsys, "eval", tmp_path / "q")
    assert rc == 2 and "pass --data FOLDER of images" in err


def test_images_for_other_models_are_refused(tmp_path, capsys):
    from lowbit.models.tiny import tiny_hf_tokenizer

    images = _images(tmp_path / "imgs", 2)
    tiny_hf("llama").save_pretrained(tmp_path / "llama", safe_serialization=True)
    tiny_hf_tokenizer().save_pretrained(tmp_path / "llama")
    rc, _, err = _cli(capsys, "quantize", tmp_path / "llama", "--scheme", "int4-g32-asym", "--method", "gptq",
                      "--calib-data", images, "--out", tmp_path / "q")
    assert rc == 2 and "is a folder of images; a causal-lm model calibrates on text" in err
    (images / "a.wav").write_bytes(b"RIFF")
    rc, _, err = _cli(capsys, "eval", tmp_path / "llama", "--data", images)
    assert rc == 2 and "holds both .wav clips and images" in err

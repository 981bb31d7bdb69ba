"""Images with a prompt for vision-language models (``image-text-to-text``: LLaVA, SmolVLM, Qwen2-VL, ...).

A folder of images (``.png``, ``.jpg``, ``.jpeg``, ``.webp``, ``.bmp``; sorted by name) and one prompt become
the model's inputs through its own processor (``lowbit.models.hf.load_processor``): the prompt is laid out by
the processor's chat template (a user turn holding the image and the prompt, then the assistant's turn), or,
without a template, as the processor's image token followed by the prompt. The processor then expands the image
token and turns the image into pixel values, exactly as the model expects.

For calibration and for agreement with the float model, each input is extended by the float model's own greedy
answer (``lowbit.data.teacher.continuation_batches``), so the language model is observed on the text it
generates, not only on the prompt.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from lowbit.errors import InputError

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_PROMPT = "Describe this image."


def image_files(folder: str | Path) -> list[Path]:
    """The image files directly inside ``folder``, sorted by name (empty if none)."""
    folder = Path(folder).expanduser()
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def image_folder(folder: str | Path, limit: int | None = None) -> list[tuple[Path, Image.Image]]:
    """(path, RGB image) for the images of ``folder`` (at most ``limit``). InputError for a missing folder, a folder
    without images, or a file that is not a readable image (named)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder (vision-language models read a folder of images)")
    files = image_files(folder)
    if not files:
        raise InputError(f"{folder}: no image file ({', '.join(IMAGE_SUFFIXES)})")
    out = []
    for p in files[:limit]:
        try:
            with Image.open(p) as im:
                out.append((p, im.convert("RGB")))
        except (UnidentifiedImageError, OSError, ValueError) as e:
            raise InputError(f"{p}: not a readable image ({type(e).__name__}: {e})") from None
    return out


def prompt_text(processor: Any, prompt: str) -> str:
    """The text that goes with one image: the processor's chat template applied to a user turn (the image, then
    ``prompt``) with the assistant's turn opened, or ``image token + newline + prompt`` without a template."""
    if not prompt.strip():
        raise InputError("the prompt (--prompt) is empty")
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    token = getattr(processor, "image_token", None) or getattr(getattr(processor, "tokenizer", None), "image_token",
                                                                None)
    if not token:
        raise InputError(f"{type(processor).__name__} has neither a chat template nor an image token, so lowbit cannot "
                         f"place the image in the prompt; build the inputs from Python and pass them to quantize()")
    return f"{token}\n{prompt}"


def vision_language_inputs(processor: Any, images: list[tuple[Path, Image.Image]], prompt: str) -> list[dict]:
    """One batch per image: the processor's tensors (``input_ids``, ``attention_mask``, ``pixel_values`` and any
    others it makes) for the image with ``prompt`` (see :func:`prompt_text`)."""
    if processor is None:
        raise InputError("this vision-language model's folder has no processor (processor_config.json / "
                         "preprocessor_config.json with its tokenizer), which turns an image and a prompt into inputs")
    if not images:
        raise InputError("no image to make vision-language inputs from")
    text = prompt_text(processor, prompt)
    out = []
    for path, image in images:
        try:
            enc = processor(images=image, text=text, return_tensors="pt")
        except (ValueError, TypeError, KeyError) as e:
            raise InputError(f"{path}: the model's processor refused it ({type(e).__name__}: {e})") from None
        out.append(dict(enc))
    return out


__all__ = ["DEFAULT_PROMPT", "IMAGE_SUFFIXES", "image_files", "image_folder", "prompt_text", "vision_language_inputs"]

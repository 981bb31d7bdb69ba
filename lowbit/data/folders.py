"""A data folder given on the command line (``--calib-data FOLDER``, ``--data FOLDER``), told apart by what it holds:
``.wav`` clips for speech models (``lowbit.data.audio``), images for vision-language models
(``lowbit.data.vision_language``)."""

from __future__ import annotations

from pathlib import Path

from lowbit.data.audio import AUDIO_SUFFIX, OTHER_AUDIO_SUFFIXES, Clip, audio_folder
from lowbit.data.vision_language import IMAGE_SUFFIXES, image_files, image_folder
from lowbit.errors import InputError


def media_folder(path: str | Path, limit: int | None) -> tuple[list[Clip] | None, list | None]:
    """(audio clips, None) or (None, images) from a data folder, at most ``limit`` of them. InputError for a folder
    with neither, or with both."""
    folder = Path(path).expanduser()
    has_audio = any(p.suffix.lower() == AUDIO_SUFFIX for p in folder.iterdir())
    has_images = bool(image_files(folder))
    if has_audio and has_images:
        raise InputError(f"{folder}: holds both .wav clips and images; give a folder of one kind (audio for speech "
                         f"models, images for vision-language models)")
    if has_images:
        return None, image_folder(folder, limit)
    if has_audio or any(p.suffix.lower() in OTHER_AUDIO_SUFFIXES for p in folder.iterdir()):
        return audio_folder(folder, limit), None  # (audio in another format only: its error says how to convert)
    raise InputError(f"{folder}: no .wav clip (speech models) and no image ({', '.join(IMAGE_SUFFIXES)}; "
                     f"vision-language models) in it")

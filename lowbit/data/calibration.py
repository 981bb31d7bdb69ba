"""The default calibration set for a loaded model, by its kind: news text for language models, photos
disjoint from the evaluation set for image classifiers and image-to-image models."""

from __future__ import annotations

import numbers
from typing import Any

import torch

from lowbit.data.images import calibration_views
from lowbit.data.text import calibration_batches
from lowbit.errors import InputError


# kinds whose forward takes token ids alone: the default calibration set is windows of text for them
TEXT_KINDS = ("causal-lm", "masked-lm", "sequence-classifier")
# kinds whose forward takes (N, 3, 224, 224) images, and how the calibration photos are normalised for them
# (lowbit.data.images.NORMALIZATIONS): EfficientNet-Lite's for classifiers, ImageNet's for image-to-image models
IMAGE_KINDS = {"image-classifier": "efficientnet", "image-to-image": "imagenet"}


def calibration_set(kind: str, tokenizer: Any = None, n: int | None = None, seq_len: int = 512,
                    seed: int = 0, bos: bool = False, text: str | None = None,
                    source: str = "news", model: Any = None, audio: list | None = None,
                    feature_extractor: Any = None, images: list | None = None, processor: Any = None,
                    prompt: str | None = None, dataset: str | None = None) -> torch.Tensor | list[dict]:
    """Calibration inputs for a model of ``kind`` (one of :data:`TEXT_KINDS`, a ``base-model`` with a tokenizer,
    ``seq2seq-lm``, ``image-classifier`` or ``image-to-image``). A model trained on a labelled set
    (``dataset="fashion-mnist"``, see ``lowbit.models.dataset_of``) calibrates on that set's training images,
    ``(n, 1, 28, 28)``, default n = 256, never on the test images its accuracy is measured on.

    Returns: LongTensor ``(n, seq_len)`` of token ids (default n = 128) or FloatTensor ``(n, 3, 224, 224)``
    of preprocessed images (default n = 64; normalised as :data:`IMAGE_KINDS` says: ``(x - 127) / 128`` for
    classifiers, ImageNet mean and std for image-to-image models such as ``vit-s-focus``). For a
    ``seq2seq-lm`` (T5, BART, ...; pass the float ``model``): a list of batches, each text window as the
    encoder input and the float model's own greedy output for it
    (up to ``min(seq_len, 64)`` tokens) as the decoder input, which is what the decoder reads when it
    generates. ``bos``: start every text window with the BOS token (use the model's evaluation rule,
    ``lowbit.models.default_bos``). ``text``: the user's own text for a text model
    (``lowbit.data.user_text.read_text``), named ``source`` in messages, instead of the bundled news corpus.
    A ``speech-seq2seq`` model (Whisper) has no default: ``audio`` (``lowbit.data.audio.audio_folder`` clips)
    turned into inputs by its ``feature_extractor``, with the float ``model``'s greedy transcripts as decoder
    input. An ``image-text-to-text`` model (LLaVA, SmolVLM, ...) has no default either: ``images``
    (``lowbit.data.vision_language.image_folder``) with ``prompt`` made into inputs by its ``processor``, each
    extended by the float ``model``'s greedy answer (up to ``min(seq_len, 64)`` tokens).
    """
    if n is not None and n < 1:
        raise InputError(f"the calibration set needs at least one sample, got n={n}")
    if seq_len < 1:
        raise InputError(f"calibration windows need at least one token (--calib-len), got seq_len={seq_len}")
    if not isinstance(seed, numbers.Integral) or not 0 <= seed < 2**64:  # torch would take -1 as 2**64 - 1
        raise InputError(f"the calibration seed (--seed) must be an integer from 0 to 2**64 - 1, got {seed!r}")
    if audio is not None and kind != "speech-seq2seq":
        raise InputError(f"{source} is a folder of audio; a {kind} model does not take audio")
    if images is not None and kind != "image-text-to-text":
        takes = "lowbit's photo set (leave --calib-data out)" if kind in IMAGE_KINDS else "text"
        raise InputError(f"{source} is a folder of images; a {kind} model calibrates on {takes}")
    if kind == "image-text-to-text":
        if images is None:
            raise InputError("a vision-language model calibrates on images with a prompt and lowbit bundles none for "
                             "it: pass --calib-data FOLDER of images (and --prompt)")
        if model is None:
            raise InputError("the calibration set of a vision-language model is run through the float model: pass "
                             "model=")
        from lowbit.data.teacher import calibration_inputs, continuation_batches
        from lowbit.data.vision_language import DEFAULT_PROMPT, vision_language_inputs

        prompts = vision_language_inputs(processor, images[:n] if n is not None else images, prompt or DEFAULT_PROMPT)
        return calibration_inputs(continuation_batches(model, prompts, new_tokens=min(seq_len, 64)))
    if kind in TEXT_KINDS or (kind == "base-model" and tokenizer is not None):  # a text encoder
        if tokenizer is None:
            raise InputError(f"the calibration set of a {kind} model is text, which needs its tokenizer (none was "
                             f"found next to the model)")
        return calibration_batches(tokenizer, 128 if n is None else n, seq_len, seed=seed,
                                   corpus="news" if text is None else source, bos=bos, text=text)
    if kind == "speech-seq2seq":
        if audio is None:
            raise InputError("a speech model calibrates on audio and lowbit bundles none: pass --calib-data FOLDER "
                             "of .wav files (from Python: lowbit.data.audio)")
        if model is None:
            raise InputError("the calibration set of a speech model is run through the float model: pass model=")
        from lowbit.data.audio import speech_inputs
        from lowbit.data.teacher import calibration_inputs, seq2seq_batches

        clips = audio[:n] if n is not None else audio
        return calibration_inputs(seq2seq_batches(model, None, speech_inputs(feature_extractor, clips),
                                                  new_tokens=min(seq_len, 64)))
    if kind == "seq2seq-lm":
        if tokenizer is None or model is None:
            raise InputError("the calibration set of a seq2seq-lm model is text run through the float model, which "
                             "needs the model and its tokenizer")
        from lowbit.data.teacher import calibration_inputs, seq2seq_batches

        windows = calibration_batches(tokenizer, 128 if n is None else n, seq_len, seed=seed,
                                      corpus="news" if text is None else source, text=text)
        return calibration_inputs(seq2seq_batches(model, tokenizer, windows, new_tokens=min(seq_len, 64)))
    if dataset == "fashion-mnist":
        from lowbit.data.fashion_mnist import calibration_images

        return calibration_images(256 if n is None else n, seed=seed)
    if dataset is not None:
        raise InputError(f"no calibration set for the data set {dataset!r}")
    if kind in IMAGE_KINDS:
        if text is not None:
            raise InputError(f"{source}: {kind} models calibrate on images; lowbit's own photo set is used "
                             f"without --calib-data (image folders as calibration data are not supported yet)")
        return calibration_views(64 if n is None else n, seed=seed, normalize=IMAGE_KINDS[kind])
    raise InputError(f"no default calibration set for models of kind {kind!r} (lowbit has one for "
                     f"{', '.join(TEXT_KINDS)}, seq2seq-lm, image-classifier and image-to-image models, and "
                     f"speech models given audio); quantize it from Python with "
                     f"lowbit.quantize(model, plan, data=[batch, ...]), each batch the keyword inputs of its forward")

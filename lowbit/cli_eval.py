"""``lowbit eval``: pick the measure for the model's kind and print it (``lowbit.cli`` parses the arguments).

Causal LMs: perplexity and token agreement; classifiers trained on a labelled set: accuracy; image
classifiers, image-to-image models, encoders, encoder-decoders, masked LMs, speech and vision-language models:
agreement with the float model on lowbit's data or the user's ``--data``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from lowbit.cli import _feature_extractor, _processor, _progress, _rendered, load_model_from_source
from lowbit.errors import InputError


def cmd_eval(a: argparse.Namespace) -> int:
    """``lowbit eval``: the measure that fits the model's kind, against its float model when it is an artifact."""
    from lowbit.evaluation import model_size

    user_text = None
    audio = images = None
    from lowbit.data.saved_dataset import is_saved_dataset

    if a.data is not None and Path(a.data).is_dir() and not is_saved_dataset(a.data):  # audio clips or images
        from lowbit.data.folders import media_folder

        audio, images = media_folder(a.data, a.sentences)
    elif a.data is not None:  # read (and refuse) the user's text before loading anything
        from lowbit.data.user_text import read_text

        user_text = read_text(a.data, a.data_field, a.data_split, prefer_splits=("test", "validation"))
    target, ref, kind, tokenizer, name = _load_target(a.target)
    user_text = _rendered(user_text, tokenizer)
    print(f"{name}: {model_size(target).describe()}")
    if audio is not None and kind != "speech-seq2seq":
        raise InputError(f"--data {a.data} is a folder of audio; a {kind} model is evaluated on text")
    if images is not None and kind != "image-text-to-text":
        raise InputError(f"--data {a.data} is a folder of images; a {kind} model is not evaluated on them"
                         + (f" ({kind} models use lowbit's photo set: leave --data out)"
                            if kind in ("image-classifier", "image-to-image") else ""))
    if user_text is not None and kind in ("image-classifier", "image-to-image"):
        raise InputError(f"--data is text; {kind} models are evaluated on lowbit's photo set (leave --data out)")
    from lowbit.models import dataset_of

    dataset = dataset_of(_source_of_target(a.target) or a.target)
    if dataset is not None:  # a model trained on a labelled set: its true accuracy, and agreement with float
        from lowbit.evaluation.tasks import labelled_accuracy

        for line in labelled_accuracy(ref, target, dataset, a.views, _progress()):
            print(line)
        return 0
    compared = kind in ("image-classifier", "image-to-image", "speech-seq2seq", "image-text-to-text") or (
        kind in ("base-model", "seq2seq-lm", "masked-lm", "sequence-classifier") and tokenizer is not None)
    if compared and ref is None:  # every measure but perplexity compares with the float model
        print("float model: agreement is 1 by definition; pass a quantized folder to compare")
        return 0
    if kind == "causal-lm":
        from lowbit.evaluation import fitting_protocol, perplexity

        if tokenizer is None:
            raise InputError(f"{name}: no tokenizer found (a Hugging Face folder needs its tokenizer files next to "
                             f"config.json); perplexity needs one")
        from lowbit.models import default_bos

        bos = default_bos(target if ref is None else ref) if a.bos is None else a.bos  # float model's rule
        proto = fitting_protocol(target, a.tokens, a.window, bos)
        described = proto.describe()
        if user_text is not None:
            described = f"{a.data}" + described[len(proto.corpus):]
        print(f"protocol: {described}")
        r = perplexity(target, tokenizer, proto, progress=_progress(), text=user_text)
        print(f"perplexity {r.ppl:.3f} over {r.n_tokens} tokens ({r.seconds:.0f} s)")
        if ref is not None:  # a quantized artifact: how closely it follows the float model, token by token
            from lowbit.data.text import corpus_text, token_windows
            from lowbit.evaluation.generative import token_agreement

            budget = min(a.agreement_tokens, proto.max_tokens or a.agreement_tokens)
            windows = token_windows(tokenizer, user_text if user_text is not None else corpus_text(proto.corpus),
                                    proto.window, budget, bos)
            batches = [windows[i:i + 1] for i in range(windows.shape[0])]
            print(token_agreement(ref, target, batches, f"the first {windows.numel():,} tokens of the same text",
                                  progress=_progress()).describe())
    elif kind == "image-classifier":
        from lowbit.data import imagenet_views
        from lowbit.evaluation import classifier_agreement

        images = imagenet_views()
        if a.views:
            images = images[: a.views]
        r = classifier_agreement(ref, target, images, progress=_progress())
        print(f"vs float over {r.n_images} views: top-1 agreement {100 * r.top1:.2f}%, "
              f"top-5 {100 * r.top5:.2f}%, KL {r.kl:.5f} nats")
    elif kind == "image-to-image":  # e.g. vit-s-focus: its maps against the float maps on the photo views
        from lowbit.data import imagenet_views
        from lowbit.evaluation.saliency import saliency_agreement

        images = imagenet_views(normalize="imagenet")  # (N, 3, 224, 224), ImageNet mean/std on 0..1 RGB
        if a.views:
            images = images[: a.views]
        print(f"protocol: {images.shape[0]} views (224 x 224 crops and mirrors) of lowbit's photo set, "
              f"ImageNet-normalised")
        print(saliency_agreement(ref, target, images, progress=_progress()).describe())
    elif kind == "base-model" and tokenizer is not None:
        from lowbit.evaluation import encoder_agreement

        sentences = None
        if user_text is not None:
            from lowbit.evaluation.embeddings import sentences_of

            sentences = sentences_of(user_text, str(a.data))
        print(encoder_agreement(ref, target, tokenizer, sentences, progress=_progress()).describe())
    elif kind == "speech-seq2seq":
        if audio is None:
            raise InputError(f"{name}: a speech model is evaluated on audio and lowbit bundles none: pass --data "
                             f"FOLDER of .wav files (a same-named .txt beside a clip is its transcript, for WER)")
        from lowbit.evaluation.tasks import speech_agreement

        for line in speech_agreement(ref, target, tokenizer, audio, _feature_extractor(_source_of_target(a.target)),
                                     str(a.data), a.new_tokens, _progress()):
            print(line)
    elif kind == "image-text-to-text":
        if images is None:
            raise InputError(f"{name}: a vision-language model is evaluated on images with a prompt and lowbit "
                             f"bundles none for it: pass --data FOLDER of images (and --prompt)")
        from lowbit.data.vision_language import DEFAULT_PROMPT
        from lowbit.evaluation.tasks import vision_language_agreement

        print(vision_language_agreement(ref, target, _processor(_source_of_target(a.target)), images, str(a.data),
                                        a.prompt or DEFAULT_PROMPT, a.new_tokens, _progress()).describe())
    elif kind in ("seq2seq-lm", "masked-lm", "sequence-classifier") and tokenizer is not None:
        from lowbit.evaluation.tasks import text_agreement

        print(text_agreement(kind, ref, target, tokenizer, user_text, str(a.data), a.sentences,
                             min(a.agreement_tokens, a.tokens), _progress()).describe())
    else:
        raise InputError(f"{name}: lowbit eval measures causal LMs (perplexity and token agreement), encoder-decoder "
                         f"and masked LMs, text classifiers and encoders (token, class or embedding agreement with "
                         f"float), image classifiers and image-to-image models on 3 x 224 x 224 images (class or "
                         f"map agreement); it has no measure for {kind} models yet: compare the "
                         f"quantized and float models' outputs from Python (lowbit.load(path) rebuilds the "
                         f"quantized one)")
    return 0


def _source_of_target(target: str) -> dict | None:
    """The model source of an eval target: a saved artifact's recorded source, or the folder itself."""
    from lowbit.io import read_manifest

    p = Path(target)
    if p.is_dir() and (p / "manifest.json").exists():
        return read_manifest(p).get("source")
    return {"type": "hf-folder", "path": str(p)} if p.is_dir() else None


def _load_target(path: str):
    """(model, float reference or None, kind, tokenizer, display name) for a model source or a saved folder."""
    from lowbit.io import load, read_manifest
    from lowbit.models import load_model

    p = Path(path)
    if p.is_dir() and (p / "manifest.json").exists():
        manifest = read_manifest(p)
        if manifest.get("source") is None:
            raise InputError(f"{p} records no model source; evaluate it from Python with lowbit.load(path, model=...)")
        if manifest["source"].get("type") == "hf-config":
            raise InputError(f"{p} was saved from Python: it records its class ({manifest['source'].get('class')}) "
                             f"and config but not its float weights or tokenizer, which evaluation compares with; "
                             f"evaluate it from Python (lowbit.load(path) rebuilds it)")
        model = load(p)  # verify the artifact first: its source is followed only once the files check out
        ref = load_model_from_source(manifest["source"])
        return model, ref.model, ref.kind, ref.tokenizer, f"{ref.name} [{p}]"
    lm = load_model(path)
    return lm.model, None, lm.kind, lm.tokenizer, lm.name

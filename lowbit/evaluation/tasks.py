"""Agreement of a quantized model with its float reference per task, as ``lowbit eval`` reports it: text models
(encoder-decoders, masked LMs, sequence classifiers) on sentences of the evaluation text or the user's, and
speech models on a folder of clips (with word error rate where transcripts are given), and classifiers trained on
a labelled set on its test images (true accuracy)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.data import teacher
from lowbit.data.audio import Clip, speech_inputs
from lowbit.data.text import token_windows, wikipedia_text
from lowbit.errors import InputError
from lowbit.evaluation.embeddings import sentences_of, wikipedia_sentences
from lowbit.evaluation.generative import TokenAgreement, token_agreement
from lowbit.evaluation.wer import word_error_rate


def text_agreement(kind: str, ref: nn.Module, model: nn.Module, tokenizer: Any, user_text: str | None,
                   source: str, n_sentences: int, masked_tokens: int, progress: bool = False) -> TokenAgreement:
    """Token (or class) agreement of ``model`` with ``ref`` (a ``seq2seq-lm``, ``masked-lm`` or
    ``sequence-classifier``) on ``n_sentences`` sentences (masked LMs: ``masked_tokens`` tokens) of the
    evaluation text, or of ``user_text`` (named ``source``)."""
    sentences = (wikipedia_sentences(n_sentences) if user_text is None
                 else sentences_of(user_text, source, n_sentences))
    named = "the evaluation text" if user_text is None else source
    if kind == "seq2seq-lm":
        batches = teacher.seq2seq_batches(ref, tokenizer, sentences, progress=progress)
        what = f"teacher-forced on the float model's greedy outputs for {len(sentences)} sentences of {named}"
    elif kind == "masked-lm":
        windows = token_windows(tokenizer, user_text if user_text is not None else wikipedia_text(), 128,
                                masked_tokens)
        batches = teacher.masked_batches(tokenizer, windows)
        what = f"15% of {windows.numel():,} tokens of {named} masked"
    else:
        batches = teacher.sentence_batches(tokenizer, sentences)
        what = f"class distributions of {len(sentences)} sentences of {named}"
    return token_agreement(ref, model, batches, what, progress=progress)


def vision_language_agreement(ref: nn.Module, model: nn.Module, processor: Any, images: list, source: str,
                              prompt: str, new_tokens: int, progress: bool = False) -> TokenAgreement:
    """Token agreement on the float model's greedy answers to ``prompt`` about each of ``images``
    (``lowbit.data.vision_language.image_folder``), teacher-forced."""
    from lowbit.data.vision_language import vision_language_inputs

    prompts = vision_language_inputs(processor, images, prompt)
    batches = teacher.continuation_batches(ref, prompts, new_tokens, progress=progress)
    what = f"{len(images)} image(s) of {source} with the prompt {prompt!r}, teacher-forced on the float model's answers"
    return token_agreement(ref, model, batches, what, progress=progress)


def speech_agreement(ref: nn.Module, model: nn.Module, tokenizer: Any, clips: list[Clip], feature_extractor: Any,
                     source: str, new_tokens: int, progress: bool = False) -> list[str]:
    """Report lines: token agreement on the float model's greedy transcripts of ``clips``; the word error rate
    of both models' transcripts where clips have a reference transcript."""
    inputs = speech_inputs(feature_extractor, clips)
    batches = teacher.seq2seq_batches(ref, tokenizer, inputs, new_tokens=new_tokens, progress=progress)
    what = f"teacher-forced on the float model's greedy transcripts of {len(clips)} clips of {source}"
    lines = [token_agreement(ref, model, batches, what, progress=progress).describe()]
    pairs = [(i, c.transcript) for i, c in enumerate(clips) if c.transcript is not None]
    if not pairs:
        return lines + ["no transcripts beside the clips (clip.txt next to clip.wav): no word error rate"]
    if tokenizer is None:
        raise InputError("word error rate needs the model's tokenizer to read its transcripts; none was found")
    float_text = [t for b in batches for t in tokenizer.batch_decode(b["decoder_input_ids"], skip_special_tokens=True)]
    quant_text: list[str] = []
    with torch.inference_mode():
        for enc in inputs:
            out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, num_beams=1)
            quant_text += tokenizer.batch_decode(out, skip_special_tokens=True)
    refs = [t for _, t in pairs]
    return lines + [f"float     {word_error_rate(refs, [float_text[i] for i, _ in pairs]).describe()}",
                    f"quantized {word_error_rate(refs, [quant_text[i] for i, _ in pairs]).describe()}"]


__all__ = ["speech_agreement", "text_agreement"]


def labelled_accuracy(ref: nn.Module | None, model: nn.Module, dataset: str, limit: int | None = None,
                      progress: bool = False) -> list[str]:
    """Lines reporting ``model``'s top-1 accuracy on the test split of ``dataset`` ("fashion-mnist"; the first
    ``limit`` images, default all 10,000) and, given the float ``ref``, the float accuracy and the agreement of
    the two (top-1, top-5, KL)."""
    from lowbit.data.fashion_mnist import fashion_mnist, to_inputs
    from lowbit.evaluation.agreement import agreement_from_logits, classifier_logits

    if dataset != "fashion-mnist":
        raise InputError(f"no labelled evaluation for the data set {dataset!r}")
    images, labels = fashion_mnist("test")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    x = to_inputs(images)
    logits = classifier_logits(model, x, batch_size=500, progress=progress)
    acc = float((logits.argmax(-1) == labels).float().mean())
    lines = [f"Fashion-MNIST test set, {len(labels):,} images: top-1 accuracy {100 * acc:.2f}%"]
    if ref is not None:
        ref_logits = classifier_logits(ref, x, batch_size=500, progress=progress)
        ref_acc = float((ref_logits.argmax(-1) == labels).float().mean())
        r = agreement_from_logits(ref_logits, logits)
        lines.append(f"float model: {100 * ref_acc:.2f}% ({100 * (acc - ref_acc):+.2f} points); agreement with "
                     f"float: top-1 {100 * r.top1:.2f}%, top-5 {100 * r.top5:.2f}%, KL {r.kl:.5f} nats")
    return lines

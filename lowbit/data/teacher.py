"""Inputs that compare a quantized model with its float reference position by position (teacher forcing),
per task, and the same inputs as calibration data: encoder-decoder sources with the float model's own greedy
outputs as decoder inputs, masked-LM windows, sentence batches for classifiers. Dict batches carry a boolean
``score_mask`` of the positions ``lowbit.evaluation.generative.token_agreement`` scores;
:func:`calibration_inputs` drops it."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import InputError


def seq2seq_batches(ref: nn.Module, tokenizer: Any, sources: list[str] | torch.Tensor | list[dict],
                    new_tokens: int = 32, max_source_tokens: int = 128, batch_size: int = 8,
                    progress: bool = False) -> list[dict]:
    """Teacher-forcing inputs for an encoder-decoder: each source (a sentence, a row of token ids, or batches
    of encoder inputs already made, such as a speech model's ``input_features``) as the encoder input, and as
    the decoder input the float model ``ref``'s own greedy output for it (up to ``new_tokens``), with
    ``score_mask`` on the positions whose next token the float model produced (up to its
    end of sequence). As calibration data, pass :func:`calibration_inputs` of these (the forward's keywords).
    Raises InputError when ``ref`` cannot generate or there is no source."""
    if not hasattr(ref, "generate"):
        raise InputError(f"{type(ref).__name__} cannot generate; teacher forcing on its own outputs needs a "
                         f"generative encoder-decoder")
    if len(sources) == 0:
        raise InputError("no source text to make encoder-decoder inputs from")
    eos = getattr(ref.generation_config, "eos_token_id", None)
    eos = sorted(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    eos_ids = torch.tensor(eos, dtype=torch.long) if eos else None
    out = []
    with torch.inference_mode():
        made = isinstance(sources, list) and isinstance(sources[0], dict)
        for i in tqdm(range(0, len(sources), 1 if made else batch_size), desc="float outputs", unit="batch",
                      disable=not progress, leave=False):
            chunk = sources[i:i + batch_size]
            if made:
                enc = dict(sources[i])
            elif isinstance(chunk, torch.Tensor):
                enc = {"input_ids": chunk, "attention_mask": torch.ones_like(chunk)}
            else:
                enc = dict(tokenizer(list(chunk), padding=True, truncation=True, max_length=max_source_tokens,
                                     return_tensors="pt"))
            gen = ref.generate(**enc, max_new_tokens=new_tokens, do_sample=False, num_beams=1)  # (B, 1 + L)
            ended = torch.zeros(gen.shape[0], dtype=torch.bool)
            real = torch.ones_like(gen, dtype=torch.bool)  # the start token, then generated tokens up to eos
            for t in range(1, gen.shape[1]):
                real[:, t] = ~ended
                if eos_ids is not None:
                    ended |= torch.isin(gen[:, t], eos_ids)
            score = real.clone()
            score[:, :-1] = real[:, 1:]  # a position is scored when the float model produced the next token
            score[:, -1] = False
            out.append({**enc, "decoder_input_ids": gen, "decoder_attention_mask": real.long(),
                        "score_mask": score})
    return out


def continuation_batches(ref: nn.Module, prompts: list[dict], new_tokens: int = 32,
                         progress: bool = False) -> list[dict]:
    """Teacher-forcing inputs for a decoder-only generator given prompts (a vision-language model's image and
    text, a chat prompt): each prompt batch (the forward's keywords, one row) extended by the float model
    ``ref``'s own greedy continuation (up to ``new_tokens``), with ``score_mask`` on the positions whose next
    token the float model produced, up to its end of sequence."""
    if not hasattr(ref, "generate"):
        raise InputError(f"{type(ref).__name__} cannot generate; teacher forcing on its own outputs needs a generator")
    if not prompts:
        raise InputError("no prompt to continue")
    eos = getattr(getattr(ref, "generation_config", None), "eos_token_id", None)
    eos = set(eos) if isinstance(eos, (list, tuple)) else ({eos} if eos is not None else set())
    out = []
    with torch.inference_mode():
        for enc in tqdm(prompts, desc="float outputs", unit="prompt", disable=not progress, leave=False):
            ids = enc["input_ids"]
            if ids.shape[0] != 1:
                raise InputError(f"continuation_batches takes one prompt per batch, got {ids.shape[0]}")
            gen = ref.generate(**enc, max_new_tokens=new_tokens, do_sample=False, num_beams=1)  # prompt + new
            n_prompt = ids.shape[1]
            new = gen[0, n_prompt:].tolist()
            stop = next((i + 1 for i, t in enumerate(new) if t in eos), len(new))  # keep the end token itself
            gen = gen[:, :n_prompt + stop]
            score = torch.zeros(gen.shape, dtype=torch.bool)
            score[0, n_prompt - 1:n_prompt - 1 + stop] = True  # these positions predict the generated tokens
            batch = {**enc, "input_ids": gen, "score_mask": score}
            mask = enc.get("attention_mask")
            if mask is not None:
                batch["attention_mask"] = torch.cat([mask, mask.new_ones(1, gen.shape[1] - n_prompt)], dim=1)
            out.append(batch)
    return out


def calibration_inputs(batches: list[dict]) -> list[dict]:
    """``batches`` without their ``score_mask`` (the keyword inputs of the model's forward)."""
    return [{k: v for k, v in b.items() if k != "score_mask"} for b in batches]


def masked_batches(tokenizer: Any, windows: torch.Tensor, fraction: float = 0.15, seed: int = 0,
                   batch_size: int = 8) -> list[dict]:
    """Masked-LM inputs: ``windows`` (n, T) of token ids with ``fraction`` of the positions (seeded, never
    special tokens) replaced by the mask token, scored there."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if mask_id is None:
        raise InputError("a masked-LM agreement needs a tokenizer with a mask token")
    g = torch.Generator().manual_seed(seed)
    special = torch.tensor(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=windows.dtype)
    out = []
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i:i + batch_size].clone()
        pick = (torch.rand(ids.shape, generator=g) < fraction) & ~torch.isin(ids, special)
        ids[pick] = mask_id
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "score_mask": pick})
    return out


def sentence_batches(tokenizer: Any, sentences: list[str], batch_size: int = 16,
                     max_tokens: int = 128) -> list[dict]:
    """Sequence-classifier inputs: the sentences in padded batches (one distribution each)."""
    return [dict(tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_tokens,
                           return_tensors="pt")) for i in range(0, len(sentences), batch_size)]


__all__ = ["calibration_inputs", "continuation_batches", "masked_batches", "sentence_batches", "seq2seq_batches"]

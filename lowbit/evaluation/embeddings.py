"""Agreement of a quantized text encoder with its float model: sentence-embedding cosine and retrieval.

A sentence's embedding is the mean of the encoder's last hidden states over its tokens (the attention mask
says which), L2-normalised: the pooling sentence-transformers' MiniLM models are trained with. Two measures
over the same sentences embedded by both models:

* cosine: of each sentence's quantized embedding with its float embedding (mean and worst);
* retrieval: every sentence queries all the others by cosine similarity; top-1 agreement is the share of
  queries whose nearest neighbour is the same under both models, recall@10 the mean overlap of the two top-10
  lists (a search index built with the float model, queried with the quantized one, sees this).

The sentences are cut from the bundled Wikipedia evaluation text (``lowbit.data.text``), deterministically.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.data.text import wikipedia_text
from lowbit.errors import InputError

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def wikipedia_sentences(n: int = 512, min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """``n`` sentences of the Wikipedia evaluation text, spread over all of it, in text order."""
    if n < 2:
        raise InputError(f"retrieval needs at least 2 sentences, got n={n}")
    return sentences_of(wikipedia_text(), "the evaluation text", n, min_chars, max_chars)


def sentences_of(text: str, source: str, n: int = 512, min_chars: int = 40, max_chars: int = 300) -> list[str]:
    """Up to ``n`` sentences of ``text`` (``min_chars..max_chars`` long, one line each), spread over all of it,
    in text order; InputError naming ``source`` when fewer than 2 are found."""
    pool = [s.strip() for s in _SENTENCE_END.split(text)]
    pool = [s for s in pool if min_chars <= len(s) <= max_chars and "\n" not in s]
    if len(pool) < 2 or (source == "the evaluation text" and len(pool) < n):
        raise InputError(f"{source} has {len(pool)} sentences of {min_chars}..{max_chars} characters on one line; "
                         f"retrieval needs {'at least 2' if source != 'the evaluation text' else n}")
    n = min(n, len(pool))
    step = len(pool) / n
    return [pool[int(i * step)] for i in range(n)]


def sentence_embeddings(model: nn.Module, tokenizer: Any, sentences: list[str], batch_size: int = 32,
                        max_tokens: int = 128, progress: bool = False) -> torch.Tensor:
    """``(len(sentences), hidden)`` float32: mean-pooled last hidden states, L2-normalised."""
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(sentences), batch_size), desc="embed", unit="batch", disable=not progress,
                      leave=False):
            enc = tokenizer(sentences[i:i + batch_size], padding=True, truncation=True, max_length=max_tokens,
                            return_tensors="pt")
            hidden = model(**enc)[0].float()  # (B, T, hidden): last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).float()  # (B, T, 1)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
            out.append(F.normalize(pooled, dim=-1))
    emb = torch.cat(out)
    if not torch.isfinite(emb).all():
        raise InputError("the encoder produced NaN/Inf embeddings")
    return emb


@dataclass(frozen=True)
class EncoderAgreement:
    n_sentences: int
    cosine_mean: float
    cosine_min: float
    retrieval_top1: float  # share of queries with the same nearest neighbour
    recall_at_10: float  # mean overlap of the two top-10 neighbour lists
    seconds: float

    def describe(self) -> str:
        return (f"vs float over {self.n_sentences} sentences: embedding cosine mean {self.cosine_mean:.5f} "
                f"(min {self.cosine_min:.5f}), retrieval top-1 agreement {100 * self.retrieval_top1:.2f}%, "
                f"recall@10 {100 * self.recall_at_10:.2f}%")


def encoder_agreement(ref: nn.Module, model: nn.Module, tokenizer: Any, sentences: list[str] | None = None,
                      progress: bool = False) -> EncoderAgreement:
    """How closely ``model``'s sentence embeddings follow ``ref``'s (see the module docstring)."""
    start = time.perf_counter()
    sentences = wikipedia_sentences() if sentences is None else sentences
    a = sentence_embeddings(ref, tokenizer, sentences, progress=progress)
    b = sentence_embeddings(model, tokenizer, sentences, progress=progress)
    cos = (a * b).sum(-1)
    k = min(10, len(sentences) - 1)
    top_a, top_b = _neighbours(a, k), _neighbours(b, k)
    same_first = (top_a[:, 0] == top_b[:, 0]).float().mean().item()
    overlap = sum(len(set(x.tolist()) & set(y.tolist())) for x, y in zip(top_a, top_b)) / (k * len(sentences))
    return EncoderAgreement(len(sentences), cos.mean().item(), cos.min().item(), same_first, overlap,
                            time.perf_counter() - start)


def _neighbours(emb: torch.Tensor, k: int) -> torch.Tensor:
    """``(n, k)`` indices of each row's k most similar other rows."""
    sim = emb @ emb.t()
    sim.fill_diagonal_(float("-inf"))
    return sim.topk(k, dim=1).indices

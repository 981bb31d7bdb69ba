"""Agreement of a quantized model with its float reference, token by token, for any model with logits.

Both models read the same inputs (teacher forcing) and every scored position compares their next-token
distributions: the mean KL(float || quantized) in nats and how often their top-1 tokens agree. What is scored
depends on the task:

- causal LMs: every position of windows of the evaluation text;
- encoder-decoders (T5, BART, ...): the decoder reads the *float model's own greedy output* for each source
  sentence (``lowbit.data.teacher.seq2seq_batches``), so the quantized model is judged on the text it would have to
  reproduce, positions after the float output's end of sequence left out;
- masked LMs: the masked positions of text windows with 15% of the tokens masked (seeded);
- sequence classifiers: one distribution per sentence.

The inputs come from ``lowbit.data.teacher``. Compute the float side once per set of batches with
:func:`reference_logits` when comparing several variants.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import InputError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenAgreement:
    """kl: mean over scored positions of KL(float || model) of the softmax distributions, nats.
    top1: fraction of scored positions where the two models' argmax agree.
    n_positions: positions scored; what: how the inputs were made (for the report)."""

    kl: float
    top1: float
    n_positions: int
    what: str = ""

    def describe(self) -> str:
        return (f"vs float, {self.what}: token KL(float||model) {self.kl:.4g} nats, top-1 agreement "
                f"{self.top1:.2%} over {self.n_positions:,} positions")


def logits_of(model: nn.Module, batch: Any) -> torch.Tensor:
    """float32 logits of ``model`` on ``batch`` (a dict of keyword inputs, or token ids), without the
    ``"score_mask"`` entry :func:`token_agreement` reads."""
    inputs = {k: v for k, v in batch.items() if k != "score_mask"} if isinstance(batch, dict) else None
    out = model(**inputs) if inputs is not None else model(batch)
    logits = getattr(out, "logits", None)
    if logits is None:
        logits = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(logits, torch.Tensor):
        raise InputError(f"{type(model).__name__} returned {type(out).__name__} without logits; token agreement "
                         f"needs a model with an output head")
    if not torch.isfinite(logits).all():
        raise InputError(f"{type(model).__name__} returned NaN/Inf logits")
    return logits.float()


def reference_logits(ref: nn.Module, batches: list, progress: bool = False) -> list[torch.Tensor]:
    """The float model's logits on each batch (kept to compare several variants against)."""
    with torch.inference_mode():
        return [logits_of(ref, b) for b in tqdm(batches, desc="float", unit="batch", disable=not progress,
                                                leave=False)]


def token_agreement(ref: nn.Module | list[torch.Tensor], model: nn.Module, batches: list, what: str = "",
                    progress: bool = False) -> TokenAgreement:
    """:class:`TokenAgreement` of ``model`` with ``ref`` (the float model, or its :func:`reference_logits`)
    over ``batches``; a dict batch's boolean ``"score_mask"`` (the logits' shape without the vocabulary)
    picks the positions scored, else all are."""
    if not batches:
        raise InputError("token agreement needs at least one batch of inputs")
    refs = ref if isinstance(ref, list) else None
    kl_sum, agree, n = 0.0, 0, 0
    with torch.inference_mode():
        for i, b in enumerate(tqdm(batches, desc="agreement", unit="batch", disable=not progress, leave=False)):
            r = refs[i] if refs is not None else logits_of(ref, b)
            q = logits_of(model, b)
            if r.shape != q.shape:
                raise InputError(f"the float and quantized logits differ in shape: {tuple(r.shape)} vs "
                                 f"{tuple(q.shape)}")
            mask = b.get("score_mask") if isinstance(b, dict) else None
            if mask is not None:
                r, q = r[mask], q[mask]
            r, q = r.reshape(-1, r.shape[-1]), q.reshape(-1, q.shape[-1])
            lr, lq = F.log_softmax(r, -1), F.log_softmax(q, -1)
            kl_sum += float((lr.exp() * (lr - lq)).sum())
            agree += int((r.argmax(-1) == q.argmax(-1)).sum())
            n += r.shape[0]
    if n == 0:
        raise InputError("token agreement scored no position (every score mask is empty)")
    return TokenAgreement(kl_sum / n, agree / n, n, what)


__all__ = ["TokenAgreement", "logits_of", "reference_logits", "token_agreement"]

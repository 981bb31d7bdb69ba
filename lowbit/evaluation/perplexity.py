"""Perplexity of a causal LM on a bundled corpus under a written-down protocol.

Every perplexity number must travel with its protocol (corpus, token budget, window, BOS rule):
``PerplexityResult.describe()`` prints both. Numbers are comparable only under the same protocol
and tokenizer.
"""

from __future__ import annotations

import inspect
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.data.text import CORPORA, corpus_text, token_windows
from lowbit.errors import InputError
from lowbit.models.registry import default_bos

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PerplexityProtocol:
    """How perplexity is measured.

    corpus: a bundled corpus name (``"wikipedia"`` for evaluation).
    max_tokens: the first ``max_tokens`` corpus tokens are used (None: the whole corpus).
    window: tokens per model call; windows do not overlap (stride = window) and carry no context
        from the previous window. bos: prepend the tokenizer's BOS token to every window (the window
        then holds ``window - 1`` corpus tokens and every corpus token is predicted); without BOS the
        first token of each window is context only and is not predicted.
    """

    corpus: str = "wikipedia"
    max_tokens: int | None = 16384
    window: int = 1024
    bos: bool = False

    def __post_init__(self) -> None:
        if self.corpus not in CORPORA:
            raise InputError(f"PerplexityProtocol.corpus: unknown {self.corpus!r}; expected one of {sorted(CORPORA)}")
        if self.window < 2:
            raise InputError(f"PerplexityProtocol.window must be >= 2, got {self.window}")
        if self.max_tokens is not None and self.max_tokens < self.window:
            raise InputError(
                f"PerplexityProtocol.max_tokens={self.max_tokens} is smaller than one window ({self.window})"
            )

    @property
    def stride(self) -> int:
        return self.window

    def describe(self) -> str:
        budget = "all tokens" if self.max_tokens is None else f"first {self.max_tokens:,} tokens"
        bos = "BOS prepended to each window" if self.bos else "no BOS"
        return f"{self.corpus}, {budget}, {self.window}-token non-overlapping windows, {bos}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "PerplexityProtocol":
        unknown = set(data) - {"corpus", "max_tokens", "window", "bos"}
        if unknown:
            raise InputError(f"PerplexityProtocol: unknown keys {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class PerplexityResult:
    """ppl = exp(nll); nll: mean negative log-likelihood per predicted token (nats);
    n_tokens: predicted tokens; seconds: wall time of the model calls."""

    ppl: float
    nll: float
    n_tokens: int
    protocol: PerplexityProtocol = field(default_factory=PerplexityProtocol)
    seconds: float = 0.0

    def describe(self) -> str:
        return f"perplexity {self.ppl:.3f} over {self.n_tokens:,} predicted tokens ({self.protocol.describe()})"


def perplexity(
    model: nn.Module, tokenizer: Any, protocol: PerplexityProtocol = PerplexityProtocol(), progress: bool = True,
    text: str | None = None,
) -> PerplexityResult:
    """Token-level perplexity of ``model`` on ``protocol.corpus`` (see :class:`PerplexityProtocol`), or on
    ``text`` (a user's own, ``lowbit.data.user_text.read_text``) with the protocol's windows, budget and BOS.

    ``model(input_ids)`` must return logits (N, T, vocab) or an object with ``.logits``; it must be in
    eval mode. One window per call, under ``torch.inference_mode``. NLL is accumulated in float64.
    Raises InputError if the model is in training mode or a window produces NaN/Inf logits.
    """
    windows = token_windows(tokenizer, corpus_text(protocol.corpus) if text is None else text, protocol.window,
                            protocol.max_tokens, protocol.bos)  # (n_windows, window)
    total_nll, n_tokens, seconds = windows_nll(model, windows, progress=progress)
    nll = total_nll / n_tokens
    result = PerplexityResult(ppl=math.exp(nll), nll=nll, n_tokens=n_tokens, protocol=protocol, seconds=seconds)
    log.info("%s [%.1f s]", result.describe(), seconds)
    return result


def windows_nll(model: nn.Module, windows: torch.Tensor, progress: bool = True) -> tuple[float, int, float]:
    """Summed NLL (nats, float64) of tokens 1.. of every window given the tokens before it.

    windows: LongTensor (n_windows, window). Returns (total_nll, n_predicted_tokens, seconds).
    """
    if model.training:
        raise InputError(f"{type(model).__name__} is in training mode (dropout active); call model.eval() first")
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise InputError(f"windows must be (n_windows, window >= 2), got shape {tuple(windows.shape)}")
    kwargs = {"use_cache": False} if _accepts(model, "use_cache") else {}
    total, count = 0.0, 0
    start = time.perf_counter()
    with torch.inference_mode():
        for i in tqdm(range(windows.shape[0]), desc="perplexity", unit="window", disable=not progress):
            ids = windows[i : i + 1]  # (1, window)
            logits = _logits(model(ids, **kwargs)).float()  # (1, window, vocab)
            if not torch.isfinite(logits).all():
                raise InputError(
                    f"window {i} (of {windows.shape[0]}, {ids.shape[1]} tokens each) gave NaN/Inf logits; "
                    f"check the model's weights and activation ranges"
                )
            nll = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="none")  # (window-1,)
            total += float(nll.double().sum())
            count += ids.shape[1] - 1
    return total, count, time.perf_counter() - start


# ---------------------------------------------------------------------------------------------
# helpers


def _logits(output: Any) -> torch.Tensor:
    logits = getattr(output, "logits", output)
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3:
        raise InputError(f"model output must be logits (N, T, vocab) or have .logits; got {type(output).__name__}")
    return logits


def _accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def fitting_protocol(
    model: nn.Module, tokens: int, window: int | None = None, bos: bool | None = None
) -> PerplexityProtocol:
    """The perplexity protocol for ``tokens`` corpus tokens with windows that fit ``model``.

    ``bos=None`` takes the model's own rule, :func:`lowbit.models.default_bos`: BOS for architectures
    trained with one (Gemma), none for the others (SmolLM2, GPT-2, OPT, the tiny models).

    ``window=None`` takes 1024 tokens, or fewer when the token budget or the model's context (its config's
    ``max_position_embeddings``, when it has one) is shorter. An explicit ``window`` longer than the context
    is an InputError: positions past it do not exist in models with learned position embeddings (GPT-2, OPT).
    """
    config = getattr(model, "config", None)
    context = getattr(config, "max_position_embeddings", None)
    context = context if isinstance(context, int) and context >= 2 else None
    if window is None:
        window = min(1024, tokens, context or 1024)
    elif context is not None and window > context:
        raise InputError(f"window {window} is longer than the model's context of {context} positions; "
                         f"use a window <= {context}")
    if bos is None:
        bos = default_bos(model)
    return PerplexityProtocol(max_tokens=tokens, window=window, bos=bos)

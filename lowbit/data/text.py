"""Bundled text corpora and tokenized windows for evaluation and calibration.

Two corpora ship inside the ``gensim`` package (see shared/ASSETS.md) and are kept apart:

* ``"wikipedia"`` -- the evaluation corpus: the English Wikipedia articles of gensim's shortened
  ``enwiki-latest-pages-articles1`` dump (redirects dropped, markup stripped, file order), ~3.1 MB.
* ``"news"`` -- the calibration corpus: the 300 Lee news stories (``lee_background.cor``), ~360 kB.

Only the standard tokenizer protocol is used: ``tokenizer(text, add_special_tokens=False)["input_ids"]``
and ``tokenizer.bos_token_id``; a Hugging Face tokenizer and :class:`lowbit.models.tiny.ByteTokenizer`
both fit.
"""

from __future__ import annotations

import bz2
import functools
import importlib.util
import logging
import re
from pathlib import Path
from typing import Any, Callable

import torch

from lowbit.errors import InputError

log = logging.getLogger(__name__)

_WIKI_FILE = "test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
_NEWS_FILE = "test/test_data/lee_background.cor"
MAX_CORPUS_PASSES = 4  # calibration tokens at most this many times the corpus (see check_calibration_size)
_TOKEN_MARGIN = 64  # tokens past the budget tokenized so that a cut mid-word cannot change the kept ones


def wikipedia_text() -> str:
    """The evaluation corpus: cleaned article text, articles joined by one blank line, in file order.

    Redirect pages are dropped; wiki markup is stripped with ``gensim``'s ``filter_wiki`` followed by
    :func:`_clean_wiki` (headings become plain lines, bold/italic quotes and gallery ``File:`` lines
    are removed). Cached in memory for the process.
    """
    return _wikipedia_text()


def news_text() -> str:
    """The calibration corpus: the Lee news stories, one story per paragraph, in file order."""
    return _news_text()


CORPORA: dict[str, Callable[[], str]] = {"wikipedia": wikipedia_text, "news": news_text}


def corpus_text(name: str) -> str:
    """Text of a bundled corpus by name (one of :data:`CORPORA`)."""
    if name not in CORPORA:
        raise InputError(f"unknown corpus {name!r}; expected one of {sorted(CORPORA)}")
    return CORPORA[name]()


def token_windows(
    tokenizer: Any, text: str, window: int, max_tokens: int | None = None, bos: bool = False
) -> torch.Tensor:
    """Non-overlapping token windows over the first ``max_tokens`` tokens of ``text``.

    The text is tokenized without special tokens. With ``bos=False`` each window holds ``window``
    text tokens; with ``bos=True`` each window is ``[bos_token_id]`` followed by ``window - 1`` text
    tokens, so every text token is still a prediction target. A trailing part shorter than a window
    is dropped. ``max_tokens=None`` uses the whole text.

    Returns: LongTensor (n_windows, window). Raises InputError when not even one window fits.
    """
    if window < 2:
        raise InputError(f"token_windows: window must be >= 2 tokens, got {window}")
    ids = _tokenize(tokenizer, text, max_tokens)  # (n_tokens,)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    per_window = window - 1 if bos else window  # text tokens per window
    n_windows = ids.numel() // per_window
    if n_windows == 0:
        raise InputError(
            f"token_windows: only {ids.numel()} tokens (max_tokens={max_tokens}), fewer than one "
            f"window of {per_window} text tokens; use a shorter window or a larger budget"
        )
    body = ids[: n_windows * per_window].view(n_windows, per_window)  # (n_windows, per_window)
    if not bos:
        return body
    bos_id = _bos_id(tokenizer)
    return torch.cat([torch.full((n_windows, 1), bos_id, dtype=torch.long), body], dim=1)


def calibration_batches(
    tokenizer: Any, n_sequences: int, seq_len: int, seed: int = 0, corpus: str = "news", bos: bool = False,
    text: str | None = None,
) -> torch.Tensor:
    """``n_sequences`` random windows of ``seq_len`` tokens from a bundled corpus.

    Start positions are drawn uniformly (with replacement) from a ``torch.Generator`` seeded with
    ``seed``, so the result depends only on (tokenizer, n_sequences, seq_len, seed, corpus); the
    global RNG is untouched. With ``bos`` each window is the tokenizer's BOS token followed by
    ``seq_len - 1`` corpus tokens (for models evaluated with BOS, such as Gemma-3); otherwise no BOS is
    added. Calibrating on ``"wikipedia"`` overlaps the evaluation text and logs a warning. ``text``: a user's
    own text (``lowbit.data.user_text``) instead of the bundled corpus; ``corpus`` then names it in messages.

    Returns: LongTensor (n_sequences, seq_len).
    """
    if n_sequences < 1 or seq_len < 1:
        raise InputError(
            f"calibration_batches: n_sequences and seq_len must be >= 1, got {n_sequences}, {seq_len}"
        )
    if corpus == "wikipedia" and text is None:
        log.warning("calibrating on 'wikipedia', which is also the evaluation corpus: results are optimistic")
    ids = _tokenize(tokenizer, corpus_text(corpus) if text is None else text, None)  # (n_tokens,)
    if ids.numel() < seq_len:
        raise InputError(
            f"calibration_batches: corpus {corpus!r} has {ids.numel()} tokens, fewer than seq_len={seq_len} "
            f"(--calib-len); use shorter windows"
        )
    check_calibration_size(n_sequences, seq_len, ids.numel(), corpus)
    body = seq_len - 1 if bos else seq_len
    if bos and (seq_len < 2 or getattr(tokenizer, "bos_token_id", None) is None):
        raise InputError("calibration_batches: bos=True needs seq_len >= 2 and a tokenizer with a BOS token")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - body + 1, (n_sequences,), generator=gen)  # (n,)
    windows = ids[starts[:, None] + torch.arange(body)[None, :]]  # (n_sequences, body)
    if bos:
        windows = torch.cat([torch.full((n_sequences, 1), int(tokenizer.bos_token_id)), windows], dim=1)
    return windows  # (n_sequences, seq_len)


def check_calibration_size(n_sequences: int, seq_len: int, corpus_tokens: int, corpus: str = "news") -> None:
    """Refuse a calibration set of more than ``MAX_CORPUS_PASSES`` times the corpus's tokens.

    Windows start at random positions drawn with replacement, so they may overlap and a set may be larger
    than the corpus; but beyond a few passes over it every token is repeated many times: no new information,
    only memory (the ids, then one hidden state per token in every calibration pass) and time. The check
    comes before anything of that size is allocated (``--calib-samples 100000000`` asked for 400 GB).
    """
    bound = MAX_CORPUS_PASSES * corpus_tokens
    if n_sequences * seq_len > bound:
        raise InputError(
            f"calibration set of {n_sequences} windows x {seq_len} tokens (--calib-samples x --calib-len) is "
            f"{n_sequences * seq_len:,} tokens, more than {MAX_CORPUS_PASSES} x the {corpus!r} corpus's "
            f"{corpus_tokens:,} tokens ({bound:,}, e.g. {max(1, bound // seq_len)} windows of {seq_len}): the "
            f"windows would only repeat the same text; ask for fewer samples or shorter windows"
        )


# ---------------------------------------------------------------------------------------------
# helpers


def _tokenize(tokenizer: Any, text: str, max_tokens: int | None) -> torch.Tensor:
    """Token ids of ``text`` (at least ``max_tokens`` + margin when there is that much text).

    Tokenizes a growing prefix cut at whitespace, so evaluating 16k tokens does not tokenize 3 MB.
    Tokens more than ``_TOKEN_MARGIN`` before the cut equal those of tokenizing the full text.
    Returns: LongTensor (n_tokens,).
    """
    n_chars = len(text) if max_tokens is None else 8 * (max_tokens + _TOKEN_MARGIN)
    while True:
        cut = _cut_at_space(text, n_chars)
        ids = _encode(tokenizer, text[:cut])
        if cut >= len(text) or len(ids) >= max_tokens + _TOKEN_MARGIN:  # type: ignore[operator]
            if cut < len(text):
                ids = ids[: len(ids) - _TOKEN_MARGIN]
            return torch.tensor(ids, dtype=torch.long)
        n_chars *= 2


def _cut_at_space(text: str, n_chars: int) -> int:
    if n_chars >= len(text):
        return len(text)
    space = text.rfind(" ", 0, n_chars)
    return space if space > 0 else n_chars


def _encode(tokenizer: Any, text: str) -> list[int]:
    try:
        out = tokenizer(text, add_special_tokens=False, verbose=False)
    except TypeError:  # minimal tokenizers without a ``verbose`` switch
        out = tokenizer(text, add_special_tokens=False)
    ids = out["input_ids"]
    return list(ids)


def _bos_id(tokenizer: Any) -> int:
    bos_id = getattr(tokenizer, "bos_token_id", None)
    if bos_id is None:
        raise InputError(
            f"bos=True but tokenizer {type(tokenizer).__name__} has no bos_token_id; use bos=False"
        )
    return int(bos_id)


def _gensim_file(relative: str) -> Path:
    spec = importlib.util.find_spec("gensim")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("the bundled corpora need the 'gensim' package; install lowbit's requirements.txt")
    path = Path(spec.submodule_search_locations[0]) / relative
    if not path.is_file():
        raise InputError(f"bundled corpus file missing: {path}; reinstall gensim==4.4.0")
    return path


@functools.lru_cache(maxsize=1)
def _wikipedia_text() -> str:
    from gensim.corpora.wikicorpus import extract_pages, filter_wiki  # slow import, so lazy

    path = _gensim_file(_WIKI_FILE)
    with bz2.open(path, "rb") as f:
        pages = list(extract_pages(f))  # [(title, wikitext, pageid)], main namespace only
    articles = [_clean_wiki(filter_wiki(text)) for _, text, _ in pages if not _is_redirect(text)]
    articles = [a for a in articles if a]
    log.debug("wikipedia corpus: %d of %d pages kept (redirects dropped)", len(articles), len(pages))
    return "\n\n".join(articles)


@functools.lru_cache(maxsize=1)
def _news_text() -> str:
    lines = _gensim_file(_NEWS_FILE).read_text(encoding="utf-8").splitlines()
    return "\n\n".join(line.strip() for line in lines if line.strip())


def _is_redirect(wikitext: str) -> bool:
    return wikitext.lstrip()[:9].lower() == "#redirect"


_HEADING = re.compile(r"^=+\s*(.*?)\s*=+$")
_EMPHASIS = re.compile(r"'{2,}")
_SPACES = re.compile(r"[ \t\u00a0]{2,}")


def _clean_wiki(text: str) -> str:
    """Readable paragraphs from ``filter_wiki`` output: one blank line between blocks."""
    lines: list[str] = []
    for raw in text.splitlines():
        line = _EMPHASIS.sub("", raw).strip().lstrip(":").strip()
        heading = _HEADING.match(line)
        if heading:
            line = heading.group(1)
        elif line.startswith(("File:", "Image:")):  # gallery entry: keep the caption only
            line = line.split("|")[-1].strip() if "|" in line else ""
        elif "|alt=" in line:  # image caption followed by alt text
            line = line.split("|alt=")[0].strip()
        line = _SPACES.sub(" ", line)
        if line or (lines and lines[-1]):
            lines.append(line)
    return "\n".join(lines).strip()

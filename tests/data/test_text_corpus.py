"""Bundled corpora (clean, separate) and token windows / calibration batches (shapes, determinism)."""

import pytest
import torch

from lowbit.data import calibration_batches, corpus_text, news_text, token_windows, wikipedia_text
from lowbit.errors import InputError
from lowbit.models import ByteTokenizer

TOK = ByteTokenizer()


def test_wikipedia_is_clean_and_large():
    text = wikipedia_text()
    assert len(text.encode("utf-8")) > 2_000_000
    assert text.startswith("Anarchism is a political philosophy")
    for markup in ("#REDIRECT", "[[", "]]", "{{", "}}", "'''", "==", "<ref", "&nbsp;"):
        assert markup not in text, markup
    assert "\n\n\n" not in text
    assert wikipedia_text() is text  # cached


def test_news_is_separate_from_wikipedia():
    news = news_text()
    stories = news.split("\n\n")
    assert len(stories) == 300 and len(news) > 300_000
    assert stories[0].startswith("Hundreds of people have been forced to vacate their homes")
    assert stories[0][:200] not in wikipedia_text()


def test_unknown_corpus():
    with pytest.raises(InputError, match="unknown corpus"):
        corpus_text("austen")


def test_token_windows_shapes():
    text = "abcdefghij" * 5  # 50 byte tokens
    w = token_windows(TOK, text, window=8, max_tokens=20)
    assert w.shape == (2, 8) and w.dtype == torch.long
    assert w.flatten().tolist() == list(text.encode())[:16]
    assert token_windows(TOK, text, window=8).shape == (6, 8)  # whole text, remainder dropped


def test_token_windows_bos():
    text = "abcdefghij" * 5
    w = token_windows(TOK, text, window=8, max_tokens=21, bos=True)
    assert w.shape == (3, 8)  # 7 text tokens per window
    assert (w[:, 0] == TOK.bos_token_id).all()
    assert w[:, 1:].flatten().tolist() == list(text.encode())[:21]


def test_token_windows_prefix_equals_full_tokenization():
    text = news_text()
    full = torch.tensor(TOK(text)["input_ids"][:4096])
    assert torch.equal(token_windows(TOK, text, window=512, max_tokens=4096).flatten(), full)


def test_token_windows_errors():
    with pytest.raises(InputError, match="fewer than one window"):
        token_windows(TOK, "short", window=16, max_tokens=100)
    with pytest.raises(InputError, match="window must be"):
        token_windows(TOK, "short", window=1)

    class NoBos(ByteTokenizer):
        bos_token_id = None

    with pytest.raises(InputError, match="bos_token_id"):
        token_windows(NoBos(), "abcdefgh" * 4, window=8, bos=True)


def test_calibration_batches_deterministic_and_from_corpus():
    a = calibration_batches(TOK, n_sequences=6, seq_len=32, seed=0)
    b = calibration_batches(TOK, n_sequences=6, seq_len=32, seed=0)
    c = calibration_batches(TOK, n_sequences=6, seq_len=32, seed=1)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    corpus = news_text().encode()
    for row in a:
        assert bytes(row.tolist()) in corpus  # a contiguous window of the news corpus


def test_calibration_batches_leave_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(2)
    torch.manual_seed(7)
    calibration_batches(TOK, n_sequences=2, seq_len=8, seed=3)
    assert torch.equal(torch.rand(2), expected)


def test_calibration_batches_errors():
    with pytest.raises(InputError):
        calibration_batches(TOK, n_sequences=0, seq_len=8)
    with pytest.raises(InputError, match="fewer than seq_len"):
        calibration_batches(TOK, n_sequences=1, seq_len=10_000_000)

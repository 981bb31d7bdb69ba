"""Text-encoder agreement: sentence-embedding cosine and retrieval agreement with the float model."""

from __future__ import annotations

import copy

import pytest
import torch

from lowbit.errors import InputError
from lowbit.evaluation import encoder_agreement, wikipedia_sentences
from lowbit.evaluation.embeddings import sentence_embeddings
from lowbit.models.tiny import tiny_hf


class Tokenizer:
    """Bytes as token ids, padded on the right (the part of the HF tokenizer protocol embeddings use)."""

    def __call__(self, texts, padding=True, truncation=True, max_length=64, return_tensors="pt"):
        ids = [list(t.encode("utf-8"))[:max_length] for t in texts]
        width = max(len(i) for i in ids)
        return {"input_ids": torch.tensor([i + [0] * (width - len(i)) for i in ids]),
                "attention_mask": torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])}


def _encoder():
    model = tiny_hf("bert").bert  # the BertModel inside: last hidden states out
    return model.eval()


def test_sentences_are_deterministic_and_spread():
    a, b = wikipedia_sentences(64), wikipedia_sentences(64)
    assert a == b and len(set(a)) == 64
    assert all(40 <= len(s) <= 300 for s in a)
    with pytest.raises(InputError, match="at least 2"):
        wikipedia_sentences(1)


def test_padding_does_not_change_an_embedding():
    model, tok = _encoder(), Tokenizer()
    alone = sentence_embeddings(model, tok, ["a short one."])
    padded = sentence_embeddings(model, tok, ["a short one.", "a much longer sentence that forces padding."])[:1]
    torch.testing.assert_close(alone, padded, rtol=0, atol=1e-5)
    assert torch.allclose(alone.norm(dim=-1), torch.ones(1))


def test_same_model_agrees_fully_and_a_perturbed_one_less():
    ref, tok = _encoder(), Tokenizer()
    sentences = wikipedia_sentences(48)
    same = encoder_agreement(ref, copy.deepcopy(ref), tok, sentences)
    assert (same.cosine_mean, same.cosine_min, same.retrieval_top1, same.recall_at_10) == pytest.approx((1, 1, 1, 1))
    noisy = copy.deepcopy(ref)
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for p in noisy.encoder.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5 * p.std())
    r = encoder_agreement(ref, noisy, tok, sentences)
    assert r.cosine_mean < 0.9999 and r.recall_at_10 < 1
    assert "embedding cosine mean" in r.describe()

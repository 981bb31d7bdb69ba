"""Tiny test models: deterministic, fp32, eval mode, fast, and the global RNG left alone."""

import time

import pytest
import torch

from lowbit.models import ByteTokenizer, is_tied, tiny_cnn, tiny_gpt2, tiny_llama, tiny_opt

LMS = [tiny_llama, tiny_gpt2, tiny_opt]
ALL = LMS + [tiny_cnn]


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("build", ALL, ids=lambda f: f.__name__)
def test_deterministic_fp32_eval(build):
    a, b, c = build(seed=0), build(seed=0), build(seed=1)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)
    assert not a.training
    assert all(p.dtype == torch.float32 for p in a.parameters())


@pytest.mark.parametrize("build", ALL, ids=lambda f: f.__name__)
def test_global_rng_untouched(build):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build(seed=5)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("build", ALL, ids=lambda f: f.__name__)
def test_builds_fast(build):
    build()  # first call pays the transformers import
    start = time.perf_counter()
    build()
    assert time.perf_counter() - start < 0.5


@pytest.mark.parametrize("build", LMS, ids=lambda f: f.__name__)
def test_causal_lm_forward(build):
    model = build()
    ids = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        logits = model(ids).logits
    assert logits.shape == (2, 12, 256)
    assert torch.isfinite(logits).all()


def test_tied_heads_as_documented():
    assert not is_tied(tiny_llama())
    assert is_tied(tiny_gpt2())
    assert is_tied(tiny_opt())


def test_tiny_cnn_shapes_and_layers():
    model = tiny_cnn()
    with torch.inference_mode():
        out = model(torch.randn(4, 3, 32, 32))
    assert out.shape == (4, 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert any(c.groups == c.in_channels == c.out_channels > 1 for c in convs)  # depthwise
    assert any(isinstance(m, torch.nn.ReLU6) for m in model.modules())
    bn = next(m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))


def test_byte_tokenizer_round_trip():
    tok = ByteTokenizer()
    ids = tok("héllo", add_special_tokens=False)["input_ids"]
    assert ids == list("héllo".encode())
    assert tok.decode(ids) == "héllo"
    assert tok("a", add_special_tokens=True)["input_ids"] == [tok.bos_token_id, ord("a")]
    assert len(tok) == 256

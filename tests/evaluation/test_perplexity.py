"""Perplexity: exact on models with known answers, protocol round trip, clear failures."""

import json
import math

import pytest
import torch
from torch import nn

from lowbit.data import news_text, token_windows
from lowbit.errors import InputError
from lowbit.evaluation.perplexity import (
    PerplexityProtocol,
    PerplexityResult,
    fitting_protocol,
    perplexity,
    windows_nll,
)
from lowbit.models import ByteTokenizer, tiny_llama

TOK = ByteTokenizer()
NEWS = PerplexityProtocol(corpus="news", max_tokens=256, window=64)


class Uniform(nn.Module):
    """Equal logits for every token: perplexity is exactly the vocabulary size."""

    def __init__(self, vocab=256):
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):  # (N, T) -> (N, T, vocab)
        return torch.zeros(*ids.shape, self.vocab)


class Bigram(nn.Module):
    """logits[t] = table[ids[t]]: the NLL can be written down by hand."""

    def __init__(self, vocab=256):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, ids):
        return self.table[ids]


class NaNAfter(Uniform):
    def __init__(self, good_calls):
        super().__init__()
        self.calls, self.good_calls = 0, good_calls

    def forward(self, ids):
        self.calls += 1
        out = super().forward(ids)
        return out if self.calls <= self.good_calls else out * float("nan")


@pytest.mark.parametrize("bos", [False, True])
def test_uniform_model_has_perplexity_vocab_size(bos):
    protocol = PerplexityProtocol(corpus="news", max_tokens=256, window=64, bos=bos)
    result = perplexity(Uniform().eval(), TOK, protocol, progress=False)
    assert result.ppl == pytest.approx(256, rel=1e-6)  # log-softmax runs in float32
    assert result.nll == pytest.approx(math.log(256), rel=1e-6)
    # without BOS 4 windows x 63 predicted tokens; with BOS 256 // 63 = 4 windows x 63 as well
    assert result.n_tokens == 4 * 63
    assert result.protocol is protocol and result.seconds >= 0


def test_bigram_model_matches_hand_computation():
    model = Bigram().eval()
    windows = token_windows(TOK, news_text(), window=64, max_tokens=256)  # (4, 64)
    logp = torch.log_softmax(model.table.detach().double(), dim=1)
    expected = -sum(logp[w[t], w[t + 1]] for w in windows for t in range(63)) / (4 * 63)
    result = perplexity(model, TOK, NEWS, progress=False)
    assert result.nll == pytest.approx(float(expected), rel=1e-6)


def test_tiny_llama_perplexity_is_sane():
    result = perplexity(tiny_llama(), TOK, NEWS, progress=False)
    assert 100 < result.ppl < 1000  # random weights: close to uniform over 256 bytes
    assert math.isfinite(result.nll)


def test_nan_logits_name_the_window():
    with pytest.raises(InputError, match="window 2 "):
        perplexity(NaNAfter(good_calls=2).eval(), TOK, NEWS, progress=False)


def test_training_mode_is_rejected():
    with pytest.raises(InputError, match="training mode"):
        perplexity(Uniform().train(), TOK, NEWS, progress=False)


def test_windows_nll_shape_check():
    with pytest.raises(InputError, match="windows must be"):
        windows_nll(Uniform().eval(), torch.zeros(8, dtype=torch.long))


def test_protocol_validation_and_round_trip():
    default = PerplexityProtocol()
    assert (default.corpus, default.max_tokens, default.window, default.bos, default.stride) == (
        "wikipedia", 16384, 1024, False, 1024)
    assert default.describe() == "wikipedia, first 16,384 tokens, 1024-token non-overlapping windows, no BOS"
    assert PerplexityProtocol.from_dict(json.loads(json.dumps(default.to_dict()))) == default
    with pytest.raises(InputError, match="corpus"):
        PerplexityProtocol(corpus="austen")
    with pytest.raises(InputError, match="smaller than one window"):
        PerplexityProtocol(max_tokens=100, window=1024)
    with pytest.raises(InputError, match="unknown keys"):
        PerplexityProtocol.from_dict({"stride": 512})


def test_result_describe_carries_the_protocol():
    result = PerplexityResult(ppl=21.4, nll=math.log(21.4), n_tokens=16368, protocol=PerplexityProtocol())
    assert "21.400" in result.describe() and PerplexityProtocol().describe() in result.describe()


def test_fitting_protocol_takes_the_models_bos_rule():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    gemma = Gemma3ForCausalLM(Gemma3TextConfig(
        vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, layer_types=["full_attention"])).eval()
    assert fitting_protocol(gemma, 2048) == PerplexityProtocol(max_tokens=2048, window=1024, bos=True)
    assert not fitting_protocol(gemma, 2048, bos=False).bos  # an explicit rule wins
    llama = tiny_llama()  # context 512
    assert fitting_protocol(llama, 2048) == PerplexityProtocol(max_tokens=2048, window=512, bos=False)
    assert fitting_protocol(llama, 2048, bos=True).bos
    assert "BOS prepended" in fitting_protocol(gemma, 2048).describe()


@pytest.mark.e2e
def test_smollm2_perplexity_in_sane_range():
    from lowbit.models import load_model

    loaded = load_model("smollm2-135m")
    protocol = PerplexityProtocol(max_tokens=2048)
    result = perplexity(loaded.model, loaded.tokenizer, protocol, progress=False)
    assert result.n_tokens == 2 * 1023
    assert 5 < result.ppl < 60, result.describe()

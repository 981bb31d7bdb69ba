"""Token agreement with the float model for every task with logits, and its inputs (lowbit.data.teacher)."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import lowbit
from lowbit.data.teacher import calibration_inputs, masked_batches, sentence_batches, seq2seq_batches
from lowbit.errors import InputError
from lowbit.evaluation.generative import reference_logits, token_agreement
from lowbit.models.tiny import example_inputs, tiny_hf, tiny_hf_tokenizer

SENTENCES = ["The river flows past the old mill.", "Prices rose again in March.", "She wrote three letters.",
             "A storm closed the northern road for two days."]


def test_a_model_agrees_with_itself():
    model = tiny_hf("llama")
    batches = [example_inputs(model, seed=s, seq=16)["input_ids"] for s in range(2)]
    r = token_agreement(model, model, batches, "self")
    assert r.kl == pytest.approx(0.0, abs=1e-6) and r.top1 == 1.0 and r.n_positions == 2 * 2 * 16


def test_kl_and_top1_are_the_textbook_values():
    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, x):
            return self.logits

    p = torch.tensor([[[0.0, 0.0]]])  # uniform
    q = torch.tensor([[[math.log(3.0), 0.0]]])  # (0.75, 0.25)
    r = token_agreement(Fixed(p), Fixed(q), [torch.zeros(1, 1)])
    assert r.kl == pytest.approx(0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25), rel=1e-5)
    assert r.n_positions == 1


def test_quantization_moves_the_distribution_and_reference_logits_are_reusable():
    model = tiny_hf("gpt2")
    batches = [example_inputs(model, seed=s, seq=16)["input_ids"] for s in range(2)]
    ref = copy.deepcopy(model)
    lowbit.quantize(model, "int4-g32-asym", progress=False)
    r = token_agreement(ref, model, batches)
    assert r.kl > 0 and 0 < r.top1 <= 1
    again = token_agreement(reference_logits(ref, batches), model, batches)
    assert again.kl == pytest.approx(r.kl) and again.top1 == r.top1


@pytest.mark.parametrize("family", ["t5", "bart"])
def test_seq2seq_batches_read_the_float_outputs(family):
    model, tok = tiny_hf(family), tiny_hf_tokenizer()
    batches = seq2seq_batches(model, tok, SENTENCES, new_tokens=6, batch_size=3)
    assert [b["input_ids"].shape[0] for b in batches] == [3, 1]
    b = batches[0]
    with torch.no_grad():
        gen = model.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"], max_new_tokens=6,
                             do_sample=False, num_beams=1)
    assert torch.equal(b["decoder_input_ids"], gen)
    mask, dec = b["score_mask"], b["decoder_input_ids"]
    assert mask.shape == dec.shape and not mask[:, -1].any()
    eos = model.generation_config.eos_token_id
    for row in range(dec.shape[0]):  # scored up to the float output's end of sequence, not after it
        ends = (dec[row, 1:] == eos).nonzero()
        last = int(ends[0]) + 1 if len(ends) else dec.shape[1] - 1
        assert mask[row, :last].all() and not mask[row, last:].any()
    assert "score_mask" not in calibration_inputs(batches)[0]
    r = token_agreement(model, model, batches)
    assert r.kl == pytest.approx(0.0, abs=1e-6) and r.n_positions == int(sum(b["score_mask"].sum() for b in batches))


def test_masked_batches_mask_ordinary_tokens_only():
    tok = tiny_hf_tokenizer()
    windows = torch.randint(5, 256, (4, 64), generator=torch.Generator().manual_seed(0))
    windows[:, 0] = tok.eos_token_id
    b = masked_batches(tok, windows, fraction=0.3, batch_size=4)[0]
    assert torch.equal(b["input_ids"] == tok.mask_token_id, b["score_mask"])
    assert not b["score_mask"][:, 0].any() and 0.2 < b["score_mask"].float().mean() < 0.4
    assert torch.equal(b["input_ids"][~b["score_mask"]], windows[~b["score_mask"]])


def test_classifier_batches_give_one_distribution_per_sentence():
    import transformers

    config = transformers.BertConfig(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=64, num_labels=3)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    batches = sentence_batches(tiny_hf_tokenizer(), SENTENCES, batch_size=3)
    assert token_agreement(model, model, batches).n_positions == len(SENTENCES)


def test_bad_inputs_are_refused():
    model = tiny_hf("llama")
    with pytest.raises(InputError, match="at least one batch"):
        token_agreement(model, model, [])
    with pytest.raises(InputError, match="cannot generate"):
        seq2seq_batches(torch.nn.Linear(2, 2), tiny_hf_tokenizer(), SENTENCES)
    with pytest.raises(InputError, match="no source"):
        seq2seq_batches(tiny_hf("t5"), tiny_hf_tokenizer(), [])
    batch = {"input_ids": torch.ones(1, 4, dtype=torch.long), "score_mask": torch.zeros(1, 4, dtype=torch.bool)}
    with pytest.raises(InputError, match="scored no position"):
        token_agreement(model, model, [batch])


def _cli(capsys, *argv):
    from lowbit.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("family,kind_words", [("t5", "teacher-forced on the float model's greedy outputs"),
                                               ("bert", "15% of"), ("llama", "the first")])
def test_cli_calibrates_and_evaluates_text_models(family, kind_words, tmp_path, capsys):
    """A folder with a tokenizer: GPTQ calibrated from the CLI (encoder-decoders on the float model's own
    outputs), then `lowbit eval` reports token agreement with float."""
    model = tiny_hf(family)
    model.save_pretrained(tmp_path / "m", safe_serialization=True)
    tiny_hf_tokenizer().save_pretrained(tmp_path / "m")
    rc, out, err = _cli(capsys, "quantize", tmp_path / "m", "--scheme", "int4-g32-asym", "--method", "gptq",
                        "--calib-samples", "8", "--calib-len", "32", "--out", tmp_path / "q")
    assert rc == 0, err
    assert "calibration set:" in out
    if family == "t5":
        assert "8 sources x 32 tokens, decoded by the float model" in out
    rc, out, err = _cli(capsys, "eval", tmp_path / "q", "--sentences", "16", "--agreement-tokens", "512",
                        "--tokens", "512", "--window", "64")
    assert rc == 0, err
    line = next(ln for ln in out.splitlines() if "token KL" in ln)
    assert kind_words in line
    kl = float(line.split("token KL(float||model) ")[1].split()[0])
    top1 = float(line.split("top-1 agreement ")[1].split("%")[0]) / 100
    assert kl > 0 and 0 < top1 <= 1

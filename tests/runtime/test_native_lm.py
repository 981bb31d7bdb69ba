"""lowbit's decode engine (lowbit.runtime.native_lm): logits against the model's own forward pass, token by token."""

from __future__ import annotations

import pytest
import torch

from lowbit import QuantPlan, Rule, quantize
from lowbit.errors import InputError
from lowbit import native
from lowbit.kernels import use_kernels
from lowbit.runtime.native_lm import NativeLM, why_not

pytestmark = pytest.mark.skipif(native.why_unavailable() is not None, reason="lowbit's C++ kernels are unavailable")

STEPS = 64  # decode steps compared after an 8-token prompt


def _llama(kind: str = "llama", **extra):
    import transformers

    cls = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "qwen2": ("Qwen2Config", "Qwen2ForCausalLM"),
           "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM")}[kind]
    cfg = getattr(transformers, cls[0])(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                        tie_word_embeddings=False, **extra)
    torch.manual_seed(0)
    return getattr(transformers, cls[1])(cfg).eval()


def _quantized(model, fmt: str, **rule):
    if fmt != "float":
        quantize(model, QuantPlan((Rule("*", fmt, "rtn", **rule),), skip=("type:Embedding",)), None, progress=False)
        use_kernels(model)
    return model


def _max_error(model, exact: bool) -> tuple[float, float]:
    """(largest |logit difference| over the prompt's last position and STEPS decode steps, largest |logit|)."""
    ids = torch.randint(0, 256, (1, 8 + STEPS), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        ref = model(ids).logits[0]
    lm = NativeLM(model, max_len=16, exact=exact)  # grown by step() as decoding goes past it
    errs = [float((lm.prefill(ids[:, :8]) - ref[7]).abs().max())]
    errs += [float((lm.step(int(ids[0, t]), t) - ref[t]).abs().max()) for t in range(8, 8 + STEPS)]
    return max(errs), float(ref.abs().max())


@pytest.mark.parametrize("fmt", ["float", "int4-g32-asym", "int4-g64-asym", "int4-g128", "int4-ch-asym", "int8",
                                 "int8-asym"])
def test_exact_engine_equals_the_reference_path_within_float_rounding(fmt):
    err, scale = _max_error(_quantized(_llama(), fmt), exact=True)
    assert err <= 2e-5 * max(scale, 1.0), (fmt, err)


@pytest.mark.parametrize("fmt", ["int4-g64-asym", "int4-g128", "int4-ch-asym"])
def test_int8_activation_blocks_stay_within_their_rounding_bound(fmt):
    """The default engine quantizes 4-bit products' activations to int8 blocks (where the CPU has AVX-512 VNNI):
    each activation moves by at most half a step (max|x_block| / 254), so the logits move by about 1% of their
    range here, and never by 5%; the exact engine is 1,000x closer (test above)."""
    model = _quantized(_llama(), fmt)
    err, scale = _max_error(model, exact=False)
    exact_err, _ = _max_error(model, exact=True)
    assert err <= 0.05 * scale, (fmt, err, scale)
    from lowbit.cpu_features import cpu_flags

    if "avx512_vnni" in (cpu_flags() or ()):
        assert err > 10 * exact_err  # the integer path did run
        assert NativeLM(model).engine_prefill and not NativeLM(model, exact=True).engine_prefill


def test_a_prompt_in_chunks_gives_the_same_cache_and_logits(monkeypatch):
    from lowbit.runtime import native_lm

    model = _quantized(_llama(), "int4-g64-asym")
    ids = torch.randint(0, 256, (1, 20), generator=torch.Generator().manual_seed(5))
    whole = NativeLM(model, max_len=32)
    a = whole.prefill(ids)
    monkeypatch.setattr(native_lm, "PREFILL_CHUNK", 6)
    chunked = NativeLM(model, max_len=32)
    b = chunked.prefill(ids)
    assert torch.equal(a, b) and torch.equal(whole.k_cache, chunked.k_cache)


@pytest.mark.parametrize("kind,extra", [("qwen2", {}), ("qwen3", {"head_dim": 32}),
                                        ("mistral", {"sliding_window": None})])
def test_other_llama_family_architectures(kind, extra):
    """Qwen2's q/k/v biases, Qwen3's per-head q/k norms, Mistral's layout: the same step, exact."""
    model = _quantized(_llama(kind, **extra), "int4-g64-asym")
    err, scale = _max_error(model, exact=True)
    assert err <= 2e-5 * max(scale, 1.0), (kind, err)


def test_awq_input_scale_is_applied():
    model = _llama()
    quantize(model, QuantPlan((Rule("*proj", "int4-g64-asym", "awq"),), skip=("type:Embedding", "lm_head")),
             [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(2))], progress=False)
    use_kernels(model)
    layer = model.model.layers[0].mlp.down_proj
    assert layer.input_scale is not None
    err, scale = _max_error(model, exact=True)
    assert err <= 2e-5 * max(scale, 1.0)


def test_refusals_name_the_reason():
    from lowbit.models.tiny import tiny_gpt2

    assert "model type 'gpt2'" in why_not(tiny_gpt2())
    assert "on meta" in why_not(_llama().to("meta"))
    from lowbit.spec import ActivationQuant, QuantSpec

    model = _quantized(_llama(), "int4-ch-asym", act=ActivationQuant(QuantSpec.parse("int8-token"), dynamic=True))
    assert "runs w4a8" in why_not(model)
    with pytest.raises(InputError, match="cannot run this model"):
        NativeLM(model)


def test_the_cache_grows_and_keeps_what_it_holds():
    model = _quantized(_llama(), "int4-g64-asym")
    ids = torch.randint(0, 256, (1, 40), generator=torch.Generator().manual_seed(3))
    small, big = NativeLM(model, max_len=9, exact=True), NativeLM(model, max_len=64, exact=True)
    small.prefill(ids[:, :8])
    big.prefill(ids[:, :8])
    for t in range(8, 40):
        assert torch.equal(small.step(int(ids[0, t]), t), big.step(int(ids[0, t]), t))
    assert small.max_len >= 40


def test_one_and_two_threads_give_the_same_logits():
    model = _quantized(_llama(), "int4-g64-asym")
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(4))
    runs = []
    for threads in (1, 2):
        lm = NativeLM(model, max_len=32)
        lm.prefill(ids[:, :8])
        runs.append(torch.stack([lm.step(int(ids[0, t]), t, threads).clone() for t in range(8, 24)]))
    assert torch.equal(runs[0], runs[1])  # each output row is computed by one thread either way


def test_the_engine_keeps_its_weights_when_the_model_is_packed_again():
    """use_kernels() again gives every module new packed tensors; the engine still reads its own."""
    import gc

    model = _quantized(_llama(), "int4-g64-asym")
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(6))
    lm = NativeLM(model, max_len=16, exact=True)
    lm.prefill(ids[:, :8])
    before = lm.step(int(ids[0, 8]), 8).clone()
    use_kernels(model)
    gc.collect()
    lm.prefill(ids[:, :8])
    assert torch.equal(lm.step(int(ids[0, 8]), 8), before)

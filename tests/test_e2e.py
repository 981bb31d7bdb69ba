"""End to end on the real bundled models: quantize -> save -> load from disk -> measure. Marked ``e2e``.

Few and quick (about 75 s on 2 otherwise idle cores, plus about 65 s for Gemma). The bounds sit below measured
values with margin:

* EfficientNet-Lite0, int8 per channel, 220 evaluation views: bias correction (64 calibration views) 98.6% top-1
  agreement, KL 0.0020 nats; plain round-to-nearest 93.2%.
* SmolLM2-135M, int4-g128-asym round-to-nearest, Wikipedia, first 2,048 tokens in 512-token windows: perplexity
  21.76 float -> 28.22 (1.30x); linear weights at 4.203 bits (an fp16 scale and a uint8 zero point per group of
  128, plus the shorter last group of each 576-wide row); the folder is 0.31x the fp32 state.
* Gemma-3-270M float, first 2,048 tokens in 1024-token windows with BOS (its default protocol): perplexity 22.3
  (37.8 without BOS). Loading it takes 40-70 s (transformers parses the 262k-token GGUF vocabulary three times).
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re

import pytest
import torch

import lowbit
from lowbit import QuantPlan
from lowbit.cli import main
from lowbit.evaluation import PerplexityProtocol, artifact_size, classifier_agreement, classifier_logits
from lowbit.evaluation import model_size, perplexity

pytestmark = pytest.mark.e2e


@pytest.fixture(autouse=True, scope="module")
def two_threads():
    """tests/conftest.py pins one intra-op thread for the unit tests; these run real models, so they take two
    (unless OMP_NUM_THREADS says otherwise: on a CPU shared with other jobs one thread can be faster)."""
    before = torch.get_num_threads()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


# ---- EfficientNet-Lite0 ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def effnet_views() -> tuple[torch.Tensor, torch.Tensor]:
    """(the 220 evaluation views, the float model's logits on them): the float model runs once."""
    from lowbit.data import imagenet_views

    images = imagenet_views()  # (220, 3, 224, 224)
    return images, classifier_logits(lowbit.load_model("efficientnet-lite0").model, images, progress=False)


def _effnet_int8_agreement(plan: QuantPlan, data, views, tmp_path):
    images, ref_logits = views
    lm = lowbit.load_model("efficientnet-lite0")
    lowbit.quantize(lm.model, plan, data, progress=False)
    path = lowbit.save(lm.model, tmp_path / "effnet-w8", source=lm.source, plan=plan)
    del lm
    loaded = lowbit.load(path)  # measure what was written
    return classifier_agreement(ref_logits, loaded, images, progress=False)


def test_efficientnet_int8_bias_correction_agrees_with_float(effnet_views, tmp_path):
    from lowbit.data import calibration_views

    plan = QuantPlan.uniform("int8", bias_correction=True)
    r = _effnet_int8_agreement(plan, calibration_views(64), effnet_views, tmp_path)
    assert r.n_images == 220
    assert r.top1 >= 0.98, r.describe()  # measured 98.64%
    assert r.kl < 0.005, r.describe()  # measured 0.0020


def test_efficientnet_w8a8_asymmetric_bias_corrected_recipe(effnet_views, tmp_path):
    """recipes/cnn-w8a8-asym-bc.yaml: static per-tensor 8-bit inputs with zero points, bias correction."""
    from pathlib import Path

    from lowbit.data import calibration_views

    plan = QuantPlan.load(Path(__file__).resolve().parents[1] / "recipes/cnn-w8a8-asym-bc.yaml")
    r = _effnet_int8_agreement(plan, list(calibration_views(64).split(8)), effnet_views, tmp_path)
    assert r.top1 >= 0.945, r.describe()  # measured 95.91% (symmetric, no correction: 93.18%)
    assert r.kl < 0.0065, r.describe()  # measured 0.00471 (symmetric, no correction: 0.0130)


def test_efficientnet_int8_analytic_bias_correction_needs_no_data(effnet_views, tmp_path):
    r = _effnet_int8_agreement(QuantPlan.uniform("int8", bias_correction="analytic"), None, effnet_views, tmp_path)
    assert r.top1 >= 0.98, r.describe()  # measured 98.64% (the measured correction: 98.64%; none: 93.18%)
    assert r.kl < 0.005, r.describe()  # measured 0.0023


def test_efficientnet_int8_round_to_nearest_agrees_with_float(effnet_views, tmp_path):
    r = _effnet_int8_agreement(QuantPlan.uniform("int8"), None, effnet_views, tmp_path)
    assert r.top1 >= 0.90, r.describe()  # measured 93.18%


def test_cli_quantize_and_inspect_efficientnet(capsys, tmp_path):
    out = tmp_path / "effnet-w8"
    assert main(["quantize", "efficientnet-lite0", "--scheme", "int8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "bits/weight" in printed
    assert main(["inspect", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines() if re.match(r"\S+\s+Quant(Conv2d|Linear)\s", line)]
    manifest = lowbit.io.read_manifest(out)
    assert len(rows) == len(manifest["layers"]) == 50  # all 49 convolutions and the classifier
    assert {r[1] for r in rows} == {"QuantConv2d", "QuantLinear"} and {r[3] for r in rows} == {"int8"}
    sqnr = [float(r[5]) for r in rows]
    assert min(sqnr) > 25.0 and sorted(sqnr)[len(sqnr) // 2] > 35.0  # int8 per channel: ~40 dB typical


def test_efficientnet_w8a8_int8_graph_and_onnx_agree_with_lowbit(effnet_views, tmp_path):
    """W8A8 (static activations): the fused int8 graph and the ONNX file in onnxruntime against lowbit's
    reference path on every fourth evaluation view (55)."""
    from lowbit.bench import vision_plan
    from lowbit.data import calibration_views
    from lowbit.export.onnx import export_onnx, onnxruntime_session
    from lowbit.kernels import int8_conv_graph, use_kernels
    from lowbit.cpu_features import has_vnni

    images, float_logits = effnet_views[0][::4].contiguous(), effnet_views[1][::4]
    model = lowbit.load_model("efficientnet-lite0").model
    lowbit.quantize(model, vision_plan(), list(calibration_views(64).split(8)), progress=False)
    ref = classifier_logits(model, images, progress=False).argmax(-1)
    r = export_onnx(model, tmp_path / "effnet.onnx", images[:2], kind="image-classifier", check=images[:8])
    assert r.rel_diff < 0.1 and r.quantized_modules == 50, r.describe()  # activation-code ties: see export_onnx
    s = onnxruntime_session(r.path)
    got = torch.from_numpy(s.run(None, {"pixel_values": images.numpy()})[0]).argmax(-1)
    assert float((got == ref).float().mean()) >= 0.94  # measured 98.2% (54 of 55)
    use_kernels(model)
    fast, report = int8_conv_graph(model)
    if not has_vnni():  # oneDNN's int8 convolution is not exact without VNNI: nothing is fused, each says why
        assert not report.folded and len(report.declined) == 49, report.describe()
        return
    assert len(report.folded) == 49 and len(report.links) == 49 and len(report.integer_adds) == 9, report.describe()
    assert report.heads == ["_fc"], report.describe()  # pooling and classifier on codes: integer end to end
    fused = classifier_logits(fast, images, progress=False).argmax(-1)
    assert float((fused == ref).float().mean()) >= 0.94  # measured 98.2% (54 of 55)
    assert float((fused == float_logits.argmax(-1)).float().mean()) >= 0.88  # measured 92.7%


# ---- SmolLM2-135M ------------------------------------------------------------------------------------------------


PROTOCOL = PerplexityProtocol(max_tokens=2048, window=512)


@pytest.fixture(scope="module")
def smollm2():
    """SmolLM2-135M in float, loaded once (about 20 s)."""
    return lowbit.load_model("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_w4(smollm2, tmp_path_factory):
    """Float perplexity, then int4-g128-asym RTN -> save -> load -> perplexity of the loaded model."""
    lm = smollm2
    float_bytes = model_size(lm.model).total_bytes  # fp32 state, the tied embedding / lm_head once
    ppl_float = perplexity(lm.model, lm.tokenizer, PROTOCOL, progress=False).ppl
    plan = QuantPlan.uniform("int4-g128-asym")
    model = lowbit.quantize(copy.deepcopy(lm.model), plan, progress=False)  # the shared model stays float
    path = lowbit.save(model, tmp_path_factory.mktemp("smollm2") / "w4", source=lm.source, plan=plan)
    loaded = lowbit.load(path)
    ppl_q = perplexity(loaded, lm.tokenizer, PROTOCOL, progress=False).ppl
    return {"path": path, "loaded": loaded, "float_bytes": float_bytes, "ppl_float": ppl_float, "ppl_q": ppl_q}


def test_smollm2_int4_perplexity(smollm2_w4):
    ppl_float, ppl_q = smollm2_w4["ppl_float"], smollm2_w4["ppl_q"]
    assert 5.0 < ppl_float < 100.0, ppl_float
    assert torch.isfinite(torch.tensor(ppl_q))
    assert ppl_float < ppl_q < 1.6 * ppl_float, (ppl_float, ppl_q)


def test_smollm2_int4_size(smollm2_w4):
    size = model_size(smollm2_w4["loaded"])
    assert size.quantized_layers == 30 * 7  # every projection of the 30 blocks; lm_head and embedding stay float
    assert 4.1 < size.bits_per_quantized_weight < 4.3, size.describe()
    manifest = lowbit.io.read_manifest(smollm2_w4["path"])
    assert manifest["size"]["bits_per_quantized_weight"] == pytest.approx(size.bits_per_quantized_weight)
    on_disk = artifact_size(smollm2_w4["path"])
    assert on_disk < 0.6 * smollm2_w4["float_bytes"], (on_disk, smollm2_w4["float_bytes"])


# ---- Gemma-3-270M ------------------------------------------------------------------------------------------------


def test_gemma3_loads_generates_and_has_sane_bos_perplexity():
    """The second real LM: assembled once into the cache, tied embedding, BOS by default (its protocol)."""
    from lowbit.evaluation import fitting_protocol
    from lowbit.models import default_bos, is_tied

    lm = lowbit.load_model("gemma3-270m")
    model, tok = lm.model, lm.tokenizer
    assert type(model).__name__ == "Gemma3ForCausalLM" and not model.training and is_tied(model)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == 268_098_176  # 63% of it the 262k x 640 embedding
    ids = torch.tensor([[tok.bos_token_id, *tok("def fibonacci(n):", add_special_tokens=False).input_ids]])
    out = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert "return" in tok.decode(out[0, ids.shape[1]:]) or "if n" in tok.decode(out[0, ids.shape[1]:])
    protocol = fitting_protocol(model, 2048)
    assert default_bos(lm) and protocol == PerplexityProtocol(max_tokens=2048, window=1024, bos=True)
    result = perplexity(model, tok, protocol, progress=False)
    assert result.n_tokens == 2 * 1023
    assert 5.0 < result.ppl < 30.0, result.describe()  # measured 22.3 with BOS; 37.8 without (a lost BOS fails)


# ---- data-aware algorithms on SmolLM2 --------------------------------------------------------------------------


def test_smollm2_awq_gptq_beats_round_to_nearest_at_3_bits(smollm2, tmp_path):
    """Block-sequential AWQ + GPTQ on a small calibration set (16 x 256 news tokens), saved and loaded back.

    Measured (2,048 Wikipedia tokens, 512-token windows): int3-g64-asym RTN 65.84, AWQ + GPTQ 46.29 (0.70x)."""
    from lowbit.data import calibration_set
    from lowbit.nn import cached_weights

    lm = smollm2
    calib = calibration_set("causal-lm", lm.tokenizer, 16, 256)
    ppl = {}
    for method in ("rtn", "awq+gptq"):
        model = copy.deepcopy(lm.model)
        plan = QuantPlan.uniform("int3-g64-asym", method=method)
        lowbit.quantize(model, plan, calib if plan.needs_data else None, progress=False)
        if method != "rtn":  # the input scales and codes survive the round trip to disk
            model = lowbit.load(lowbit.save(model, tmp_path / "w3", source=lm.source, plan=plan))
        with cached_weights(model):
            ppl[method] = perplexity(model, lm.tokenizer, PROTOCOL, progress=False).ppl
    assert ppl["awq+gptq"] < 0.8 * ppl["rtn"], ppl


def test_smollm2_mixed_precision_search_puts_the_bits_where_they_matter(smollm2):
    """The fisher allocation of int3-g64-asym / int4-g64-asym at 3.875 bits per weight against the opposite choice
    within the same budget (the least sensitive groups get the 4 bits), both round to nearest."""
    from lowbit.data import calibration_set
    from lowbit.mixed import search
    from lowbit.mixed.allocate import allocate
    from lowbit.nn.size import model_size

    lm = smollm2
    calib = calibration_set("causal-lm", lm.tokenizer, 8, 128)
    result = search(lm.model, calib, ["int3-g64-asym", "int4-g64-asym"], "3.875bpw", heldout=1, gradient_samples=2,
                    progress=False)
    assert result.bits_per_weight <= 3.875 and len(result.groups) == 30 * 4  # q/k/v, o, gate/up, down per block
    limit = 3.875 * sum(result.weights)
    opposite = dataclasses.replace(result, choice=allocate([[-c for c in row] for row in result.cost], result.bits,
                                                           limit))
    ppl = {}
    for name, r in (("fisher", result), ("opposite", opposite)):
        model = lowbit.quantize(copy.deepcopy(lm.model), r.plan(), progress=False)
        assert model_size(model).bits_per_quantized_weight <= 3.875
        ppl[name] = perplexity(model, lm.tokenizer, PROTOCOL, progress=False).ppl
    assert ppl["fisher"] < 0.95 * ppl["opposite"], ppl


# ---- kernels and exports on SmolLM2 ------------------------------------------------------------------------------


def _text_ids(lm, n: int) -> torch.Tensor:
    from lowbit.data import token_windows, wikipedia_text

    return token_windows(lm.tokenizer, wikipedia_text(), n, max_tokens=n)[:1]  # (1, n)


def test_smollm2_saved_loaded_and_run_on_kernels_matches_the_reference_path(smollm2, smollm2_w4):
    from lowbit.kernels import release_kernels, use_kernels

    model, ids = smollm2_w4["loaded"], _text_ids(smollm2, 256)
    with torch.inference_mode():
        ref = model(ids).logits
        report = use_kernels(model)
        try:
            fast = model(ids).logits
        finally:
            release_kernels(model)
    from lowbit import native

    int4 = "int4-weight-bf16" if native.why_unavailable() else "int4-weight-avx2"
    assert report.counts() == {int4: 210}  # every projection; lm_head and the embedding are float
    # (torch's int4 kernel has bf16 activations): logits within 3% (relative L2), the same next token almost everywhere
    assert float((fast - ref).norm() / ref.norm()) < 0.03
    assert float((fast.argmax(-1) == ref.argmax(-1)).float().mean()) > 0.95


def test_smollm2_gguf_export_loads_in_transformers_with_the_same_logits(smollm2, tmp_path):
    from transformers import AutoModelForCausalLM

    from lowbit.export import export_gguf

    model = lowbit.quantize(copy.deepcopy(smollm2.model), QuantPlan.uniform("int4-g32"), progress=False)
    path = export_gguf(model, smollm2.source, tmp_path / "q4_0.gguf")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=path.name, dtype=torch.float32).eval()
    ids = _text_ids(smollm2, 128)
    with torch.inference_mode():
        a, b = model(ids).logits, hf(ids).logits
    assert float((a - b).abs().max()) < 1e-3 * float(a.abs().max())  # Q4_0 holds lowbit's codes exactly


def test_minilm_encoder_through_the_cli(capsys, tmp_path):
    """all-MiniLM-L6-v2 (a BERT sentence encoder, loaded as BertModel by its config) through the CLI alone:
    W8A8 keeps the sentence embeddings (measured cosine 0.9975, retrieval top-1 93.6%), GPTQ W4 g128 on text
    windows beats round to nearest (cosine 0.978 vs 0.957, benchmarks/architectures.py)."""
    def cli(*argv):
        capsys.readouterr()
        rc = main([str(a) for a in argv])
        return rc, capsys.readouterr().out

    rc, _ = cli("quantize", "minilm-l6", "--scheme", "int8", "--act", "int8-token", "--out", tmp_path / "w8a8")
    assert rc == 0
    rc, out = cli("eval", tmp_path / "w8a8")
    cos = float(re.search(r"embedding cosine mean ([0-9.]+)", out).group(1))
    top1 = float(re.search(r"retrieval top-1 agreement ([0-9.]+)%", out).group(1))
    assert rc == 0 and cos > 0.995 and top1 > 88
    results = {}
    for method in ("rtn", "gptq"):
        rc, _ = cli("quantize", "minilm-l6", "--scheme", "int4-g128-asym", "--method", method, "--calib-samples",
                    "32", "--calib-len", "128", "--out", tmp_path / method)
        assert rc == 0
        rc, out = cli("eval", tmp_path / method)
        results[method] = float(re.search(r"embedding cosine mean ([0-9.]+)", out).group(1))
    assert results["gptq"] > results["rtn"] + 0.01, results

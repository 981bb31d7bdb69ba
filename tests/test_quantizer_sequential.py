"""``quantize()`` with data-aware algorithms on tiny causal LMs: block-sequential calibration end to end."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import lowbit.quantizer as quantizer_module
from lowbit.errors import InputError
from lowbit.models import tiny
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.plan import QuantPlan, Rule
from lowbit.quantizer import quantize

ARCHS = {"llama": tiny.tiny_llama, "gpt2": tiny.tiny_gpt2, "opt": tiny.tiny_opt, "gemma3": tiny.tiny_gemma3}


def _ids(n: int, seed: int) -> torch.Tensor:
    return torch.randint(3, 256, (n, 32), generator=torch.Generator().manual_seed(seed))


def _output_error(model: nn.Module, ref_logits: torch.Tensor, test: torch.Tensor) -> float:
    with torch.inference_mode():
        return (model(test).logits - ref_logits).pow(2).mean().item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("method", ["gptq", "awq", "awq+gptq", {"name": "rtn", "clip_search": True, "weighted": True}])
def test_data_aware_methods_beat_round_to_nearest_on_the_output(arch, method):
    model = ARCHS[arch]()
    calib, test = _ids(16, 0), _ids(4, 1)
    with torch.inference_mode():
        ref = model(test).logits
    rtn = quantize(copy.deepcopy(model), QuantPlan.uniform("int3-g32-asym"), progress=False)
    q = quantize(copy.deepcopy(model), QuantPlan.uniform("int3-g32-asym", method=method), calib, progress=False)
    assert _output_error(q, ref, test) < _output_error(rtn, ref, test)


def test_sequential_and_one_pass_calibration_both_run_and_differ():
    model = tiny.tiny_llama()
    calib = _ids(16, 0)
    plan = QuantPlan.uniform("int3-g32-asym", method="gptq")
    seq = quantize(copy.deepcopy(model), plan, calib, progress=False)
    one = quantize(copy.deepcopy(model), plan, calib, progress=False, sequential=False)
    name = "model.layers.1.mlp.down_proj"  # block 1 sees block 0's quantized outputs only when sequential
    a, b = seq.get_submodule(name).dequantized_weight(), one.get_submodule(name).dequantized_weight()
    assert not torch.equal(a, b)
    name0 = "model.layers.0.self_attn.q_proj"  # block 0's inputs are the same either way
    assert torch.equal(seq.get_submodule(name0).dequantized_weight(), one.get_submodule(name0).dequantized_weight())


def test_modules_outside_the_blocks_are_quantized_too():
    """lm_head (data-aware, observed after the blocks) and the embedding (no data) next to GPTQ blocks."""
    model = tiny.tiny_llama()
    plan = QuantPlan((Rule("model.embed_tokens", "int8"), Rule("*", "int4-g32-asym", method="gptq")), skip=())
    quantize(model, plan, _ids(8, 0), progress=False)
    assert isinstance(model.model.embed_tokens, QuantEmbedding)
    assert isinstance(model.lm_head, QuantLinear)
    assert all(isinstance(m, QuantLinear) for n, m in model.named_modules() if n.endswith("_proj"))


def test_a_failure_in_a_later_block_leaves_the_model_float(fail_in_block_1):
    model = tiny.tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match="boom"):
        quantize(model, QuantPlan.uniform("int4-g32-asym", method="gptq"), _ids(8, 0), progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_data_aware_methods_need_data():
    with pytest.raises(InputError, match="calibration data"):
        quantize(tiny.tiny_llama(), QuantPlan.uniform("int4-g32-asym", method="awq+gptq"), progress=False)


def test_finished_blocks_give_up_their_float_weights(tmp_path, monkeypatch):
    """The float weights of a quantized block are kept (for undo) on disk, not in memory, and the temporary
    file is gone once quantize() returns."""
    monkeypatch.setattr(quantizer_module.tempfile, "tempdir", str(tmp_path))
    model = tiny.tiny_llama()
    original = model.model.layers[0].self_attn.q_proj
    quantize(model, QuantPlan.uniform("int4-g32-asym", method="gptq"), _ids(8, 0), progress=False)
    assert original.weight.numel() == 0
    assert list(tmp_path.iterdir()) == []


def test_a_weight_shared_with_a_later_block_stays_in_place():
    model = tiny.tiny_llama()
    shared = model.model.layers[0].mlp.down_proj.weight
    model.model.layers[1].mlp.down_proj.weight = shared
    w = shared.detach().clone()
    quantize(model, QuantPlan.uniform("int8-ch", method="gptq"), _ids(8, 0), progress=False)
    q1 = model.model.layers[1].mlp.down_proj.dequantized_weight()
    assert q1.shape == w.shape and (q1 - w).abs().max() < 0.02 * w.abs().max()


def test_undo_keeps_weights_in_memory_when_the_temporary_directory_fails(monkeypatch, caplog, fail_in_block_1):
    monkeypatch.setattr(quantizer_module.tempfile, "mkdtemp", lambda **kw: (_ for _ in ()).throw(OSError("read-only")))
    model = tiny.tiny_llama()
    before = copy.deepcopy(model.state_dict())
    with caplog.at_level("WARNING"), pytest.raises(InputError, match="boom"):
        quantize(model, QuantPlan.uniform("int4-g32-asym", method="gptq"), _ids(8, 0), progress=False)
    assert "stay in memory" in caplog.text
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch,expected", [
    ("llama", [["q_proj", "k_proj", "v_proj"], ["o_proj"], ["gate_proj", "up_proj"], ["down_proj"]]),
    ("gpt2", [["c_attn"], ["c_proj"], ["c_fc"], ["c_proj"]]),
    ("opt", [["q_proj", "k_proj", "v_proj"], ["out_proj"], ["fc1"], ["fc2"]]),
])
def test_true_sequential_stages_follow_the_block_and_its_shared_inputs(arch, expected, monkeypatch):
    from lowbit.calibration import sequential

    seen = []
    original = sequential.block_stages
    monkeypatch.setattr(sequential, "block_stages", lambda *a: seen.append(original(*a)) or seen[-1])
    quantize(ARCHS[arch](), QuantPlan.uniform("int4-g32-asym", {"name": "gptq", "true_sequential": True}),
             _ids(4, 0), progress=False)
    assert len(seen) == 2  # one per block
    assert [[n.rsplit(".", 1)[1] for n in stage] for stage in seen[0]] == expected


def test_true_sequential_observes_each_stage_after_the_stages_before_it_are_quantized(monkeypatch):
    """The o_proj Hessian of block 0 must be the one seen with q/k/v already quantized (and nothing else)."""
    from lowbit.calibration import collect_input_stats
    from lowbit.calibration.capture import Request

    model, calib = tiny.tiny_llama(), _ids(8, 0)
    seen: dict[str, torch.Tensor] = {}
    original_convert = quantizer_module._convert

    def convert(t, stats):  # records the Hessian each module was solved with
        if stats is not None:
            seen[t.name] = stats.hessian.clone()
        return original_convert(t, stats)

    monkeypatch.setattr(quantizer_module, "_convert", convert)
    gptq_ts = {"name": "gptq", "true_sequential": True}
    staged = quantize(copy.deepcopy(model), QuantPlan.uniform("int4-g32-asym", gptq_ts), calib, progress=False)
    # reference: q/k/v of block 0 quantized alone (from float inputs), then o_proj observed in one whole pass
    ref = copy.deepcopy(model)
    qkv = [f"model.layers.0.self_attn.{p}_proj" for p in "qkv"]
    quantize(ref, QuantPlan([Rule(n, "int4-g32-asym", gptq_ts) for n in qkv]), calib, progress=False)
    for n in qkv:
        assert torch.equal(ref.get_submodule(n).dequantized_weight(), staged.get_submodule(n).dequantized_weight())
    o = "model.layers.0.self_attn.o_proj"
    stats = collect_input_stats(ref, {o: Request(ref.get_submodule(o), hessian=True)}, calib, progress=False)
    assert torch.allclose(seen[o], stats[o].hessian, rtol=1e-4, atol=1e-6)
    staged_o = seen.pop(o)
    quantize(copy.deepcopy(model), QuantPlan.uniform("int4-g32-asym", "gptq"), calib, progress=False)
    assert not torch.allclose(seen[o], staged_o, rtol=1e-4, atol=1e-6)  # without stages: float q/k/v inputs


def test_bfloat16_calibration_passes_stay_close_to_float32_and_are_recorded():
    """calib_dtype="bfloat16" runs the block passes under bf16 autocast: the GPTQ result stays about as close to
    the float model as the float32 run's (the statistics are still accumulated in float32), the record says so,
    and a bad name is refused before anything changes."""
    from lowbit.nn.state import CALIBRATION_ATTR

    data = [_ids(4, s) for s in range(2)]
    test = _ids(4, 9)
    ref = tiny.tiny_llama()
    with torch.inference_mode():
        ref_logits = ref(test).logits
    plan = QuantPlan((Rule("*", "int4-g32-asym", "gptq"),), skip=("lm_head", "type:Embedding"))
    errors = {}
    for dtype in ("float32", "bfloat16"):
        model = tiny.tiny_llama()
        quantize(model, plan, data, progress=False, calib_dtype=dtype)
        errors[dtype] = _output_error(model, ref_logits, test)
        step = getattr(model, CALIBRATION_ATTR)["schedule"][0]
        assert step.get("dtype") == (None if dtype == "float32" else "bfloat16")
    assert errors["bfloat16"] < 1.25 * errors["float32"], errors
    model = tiny.tiny_llama()
    with pytest.raises(InputError, match="calib_dtype"):
        quantize(model, plan, data, progress=False, calib_dtype="fp16")
    assert not any(isinstance(m, QuantLinear) for m in model.modules())

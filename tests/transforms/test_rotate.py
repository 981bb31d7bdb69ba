"""Rotations: the float model keeps its logits, the online Hadamard reaches calibration and the quantized layer,
a rotated and quantized model saves and loads to the same outputs, and what cannot be rotated is refused by name."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

import lowbit
from lowbit.calibration import Request, collect_input_stats
from lowbit.errors import InputError
from lowbit.hadamard import hadamard_matrix
from lowbit.io import load, save
from lowbit.models import tiny
from lowbit.nn import QuantLinear, RotatedLinear
from lowbit.nn.rotation import module_input, rotate_input
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize
from lowbit.transforms import apply_transforms, check_transforms

from tests.transforms.test_fuse_norms import _ids, _logits, with_random_norms

# fp32 rounding: measured max |diff| / max |logit| of 3.7e-7 (llama rotate), 2.9e-7 (llama rotate_inputs),
# 7.3e-7 (gemma3 rotate_inputs), 3.1e-7 (gpt2), 3.5e-7 (opt)
RTOL = 1e-5


def tied_llama(seed: int = 0) -> nn.Module:
    """tiny_llama with its head tied to the embedding, as SmolLM2's is."""
    model = tiny.tiny_llama(seed)
    config = copy.deepcopy(model.config)
    config.tie_word_embeddings = True
    tied = LlamaForCausalLM(config)
    tied.load_state_dict(model.state_dict(), strict=False)
    tied.tie_weights()
    return tied.eval()


ALLOWED = [("llama", "rotate_residual"), ("llama", "rotate"), ("llama", "rotate_inputs"),
           ("tied_llama", "rotate"), ("gemma3", "rotate_inputs"), ("gpt2", "rotate_inputs"), ("opt", "rotate_inputs")]
BUILD = {"llama": tiny.tiny_llama, "tied_llama": tied_llama, "gemma3": tiny.tiny_gemma3, "gpt2": tiny.tiny_gpt2,
         "opt": tiny.tiny_opt}


@pytest.mark.parametrize("arch, transform", ALLOWED)
def test_rotations_keep_the_logits_and_undo_exactly(arch, transform):
    model = with_random_norms(BUILD[arch]())
    ids = _ids(2, 0)
    ref = _logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    originals = apply_transforms(model, [transform])
    out = _logits(model, ids)
    assert (out - ref).abs().max() < RTOL * ref.abs().max()
    rotated = [n for n, m in model.named_modules() if isinstance(m, RotatedLinear)]
    assert bool(rotated) == (transform != "rotate_residual")
    if transform != "rotate_inputs":  # the residual stream moved: the embedding changed, the outputs did not
        assert not torch.equal(model.get_input_embeddings().weight, before["model.embed_tokens.weight"])
    originals.restore()
    assert not any(isinstance(m, RotatedLinear) for m in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    if arch == "tied_llama":
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied again


def test_rotate_unties_a_tied_head_and_rotates_the_residual_stream_by_an_orthogonal_matrix():
    model = with_random_norms(tied_llama())
    emb = model.model.embed_tokens.weight.detach().clone()  # (vocab, d)
    apply_transforms(model, ["rotate"])
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert not model.config.tie_word_embeddings
    new = model.model.embed_tokens.weight.detach()
    Q = torch.linalg.lstsq(emb.double(), new.double()).solution  # E Q = E'
    assert torch.allclose(Q @ Q.T, torch.eye(Q.shape[0], dtype=Q.dtype), atol=1e-6)
    assert all(torch.all(m.weight == 1) for n, m in model.named_modules() if n.endswith("norm"))


@pytest.mark.parametrize("arch, transform, message", [
    ("gemma3", "rotate", r"'?model\.layers\.0\.post_attention_layernorm.*per-channel gain.*rotate_inputs"),
    ("gemma3", "rotate_residual", r"residual stream cannot be rotated"),
    ("gpt2", "rotate", r"transformer\.h\.0\.ln_1 is a LayerNorm"),
    ("opt", "rotate_residual", r"model\.decoder\.layers\.0\.self_attn_layer_norm is a LayerNorm"),
])
def test_a_stream_that_cannot_be_rotated_is_refused_naming_the_module(arch, transform, message):
    model = BUILD[arch]()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=message):
        apply_transforms(model, [transform])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_width_without_a_hadamard_matrix_is_refused_naming_the_module_and_the_width():
    model = tiny.tiny_llama()
    config = copy.deepcopy(model.config)
    config.intermediate_size = 92  # no Hadamard matrix of order 92 = 4 * 23 is built (91 is no prime)
    model = LlamaForCausalLM(config).eval()
    with pytest.raises(InputError, match=r"module 'model\.layers\.0\.mlp\.down_proj' \(input width 92\).*92"):
        apply_transforms(model, ["rotate"])
    assert not any(isinstance(m, RotatedLinear) for m in model.modules())
    apply_transforms(model, ["rotate_residual"])  # the offline rotation takes any width (here 64)


def test_a_model_whose_stream_the_table_misses_is_caught_by_the_logit_check():
    model = with_random_norms(tiny.tiny_llama())
    shift = torch.randn(64, generator=torch.Generator().manual_seed(2))

    def extra_writer(module, args, out):  # a write into the residual stream that the table does not list
        return (out[0] + shift, *out[1:])

    model.model.layers[1].self_attn.register_forward_hook(extra_writer)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=r"logits moved by .* the model does not fit lowbit/models/arch.py"):
        apply_transforms(model, ["rotate_residual"])
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)  # undone
    assert model.lm_head.weight is not model.model.embed_tokens.weight


def test_two_rotations_or_fuse_norms_after_one_are_refused():
    with pytest.raises(InputError, match="at most one rotation"):
        check_transforms(["rotate", "rotate_inputs"])
    with pytest.raises(InputError, match="fuse_norms must come before rotate"):
        check_transforms(["rotate", "fuse_norms"])
    assert check_transforms(["fuse_norms", "rotate"]) == ("fuse_norms", "rotate")


def test_rotated_linear_and_its_quantized_form_compute_the_same_product(gen):
    w = torch.randn(24, 48, generator=gen)  # 48 = 4 * 12: Kronecker of Sylvester 4 and Paley 12
    lin = RotatedLinear.from_weight(w, torch.randn(24, generator=gen), 48)
    x = torch.randn(5, 48, generator=gen)
    H = hadamard_matrix(48) / 48 ** 0.5
    assert torch.allclose(lin(x), (x @ H) @ w.T + lin.bias, atol=1e-5)
    blocks = RotatedLinear.from_weight(w, None, 12)  # per block of 12 (a head's width)
    assert torch.allclose(blocks(x), rotate_input(x, 12) @ w.T, atol=1e-5)
    assert torch.allclose(module_input(blocks, x), (x.view(5, 4, 12) @ (hadamard_matrix(12) / 12 ** 0.5)).view(5, 48),
                          atol=1e-5)
    model = nn.Sequential(lin)
    quantize(model, "int8", progress=False)
    q = model[0]
    assert isinstance(q, QuantLinear) and q.input_rotation == 48
    assert torch.allclose(q(x), rotate_input(x, 48) @ q.dequantized_weight().T + q.bias, atol=1e-5)
    assert (q(x) - lin(x)).abs().max() < 0.02 * lin(x).abs().max()


def test_calibration_sees_the_rotated_input(gen):
    lin = RotatedLinear.from_weight(torch.randn(8, 16, generator=gen), None, 16)
    x = torch.randn(32, 16, generator=gen)
    stats = collect_input_stats(nn.Sequential(lin), {"0": Request(lin, hessian=True)}, [x], progress=False)
    xr = rotate_input(x, 16)
    assert torch.allclose(stats["0"].hessian, xr.T @ xr / 32, rtol=1e-4, atol=1e-5)


def test_a_rotated_gptq_model_saves_and_loads_from_its_source_to_the_same_outputs(tmp_path):
    lm = lowbit.load_model("tiny-llama")
    with_random_norms(lm.model)
    ids = _ids(4, 3, 32)
    ref = _logits(lm.model, ids)
    plan = QuantPlan(QuantPlan.uniform("int4-g32-asym", "gptq").rules, transforms=("rotate",))
    quantize(lm.model, plan, [ids[:2], ids[2:]], progress=False)
    out = _logits(lm.model, ids)
    assert (out - ref).abs().max() < 0.2 * ref.abs().max()
    path = save(lm.model, tmp_path / "rot", source=lm.source, plan=plan)
    loaded = load(path)  # built from the recorded source: the transforms' structure is rebuilt first
    assert isinstance(loaded.model.layers[0].mlp.down_proj, QuantLinear)
    assert loaded.model.layers[0].mlp.down_proj.input_rotation == 128
    assert torch.equal(_logits(loaded, ids), out)


def test_a_float_rotated_linear_left_unquantized_is_rebuilt_by_load(tmp_path):
    lm = lowbit.load_model("tiny-gpt2")  # Conv1D: rotate_inputs makes RotatedLinears with transposed weights
    ids = _ids(2, 4)
    plan = QuantPlan(QuantPlan.from_dict({"rules": [{"pattern": "*.mlp.*", "weight": None},
                                                    {"pattern": "*", "weight": "int8"}]}).rules,
                     transforms=("rotate_inputs",))
    quantize(lm.model, plan, progress=False)
    c_fc = lm.model.transformer.h[0].mlp.c_fc
    assert type(c_fc) is RotatedLinear
    out = _logits(lm.model, ids)
    loaded = load(save(lm.model, tmp_path / "rot", source=lm.source, plan=plan))
    assert type(loaded.transformer.h[0].mlp.c_fc) is RotatedLinear
    assert torch.equal(_logits(loaded, ids), out)


def test_a_failed_quantization_puts_back_the_unrotated_model(fail_in_block_1):
    model = with_random_norms(tied_llama())
    before = copy.deepcopy(model.state_dict())
    plan = QuantPlan(QuantPlan.uniform("int4-g32-asym", "gptq").rules, transforms=("rotate",))
    with pytest.raises(InputError, match="boom"):
        quantize(model, plan, _ids(8, 0, 32), progress=False)
    assert not any(isinstance(m, (QuantLinear, RotatedLinear)) for m in model.modules())
    assert model.lm_head.weight is model.model.embed_tokens.weight and model.config.tie_word_embeddings
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("arch", ["gemma3", "opt"])
def test_rotate_inputs_with_gptq_activations_and_kv_saves_and_loads_the_same(arch, tmp_path):
    model = with_random_norms(BUILD[arch]())
    ids = _ids(4, 5, 32)
    ref = _logits(model, ids)
    plan = QuantPlan.from_dict({"rules": [{"pattern": "*", "weight": "int4-ch-asym", "method": "gptq",
                                           "act": "int8-token"}],
                                "transforms": ["rotate_inputs"], "kv": {"spec": "int8-token", "rotate": True}})
    quantize(model, plan, [ids[:2], ids[2:]], progress=False)
    assert all(m.input_rotation is not None for m in model.modules() if isinstance(m, QuantLinear))
    out = _logits(model, ids)
    assert (out - ref).abs().max() < 0.3 * ref.abs().max()
    loaded = load(save(model, tmp_path / "rot", plan=plan), model=with_random_norms(BUILD[arch](seed=9)))
    assert torch.equal(_logits(loaded, ids), out)


def test_the_float_tensors_kept_for_undo_wait_on_disk_and_are_deleted(monkeypatch, tmp_path, fail_in_block_1):
    monkeypatch.setenv("TMPDIR", str(tmp_path))
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    from lowbit.transforms import Originals

    seen = []
    real = Originals.offload

    def spy(self):
        real(self)
        seen.append((self._file, len(self._offloaded)))
    monkeypatch.setattr(Originals, "offload", spy)
    model = with_random_norms(tiny.tiny_llama())
    before = copy.deepcopy(model.state_dict())
    plan = QuantPlan(QuantPlan.uniform("int4-g32-asym", "gptq").rules, transforms=("rotate",))
    with pytest.raises(InputError, match="boom"):
        quantize(model, plan, _ids(8, 0, 32), progress=False)
    (file, count), = seen
    assert count > 20 and file.parent.parent == tmp_path  # every changed tensor went to the file
    assert not file.parent.exists()  # deleted once quantize() returned
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # read back bit for bit

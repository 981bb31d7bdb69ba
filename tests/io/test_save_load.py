"""save -> load is bit-exact: every state tensor (values, dtype, shape) and every output, for each storage kind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from io_models import ConvNet, TextNet, TiedLM, conv_input, quantized, seeded, text_input, with_static_act
from lowbit.errors import InputError
from lowbit.io import load, read_manifest, save
from lowbit.nn import QuantConv2d, QuantEmbedding, QuantLinear

# int4 with a partial last group (96 = 64 + 32), int8, 3-bit packing, nvfp4 (global scale), mxfp4 (e8m0
# scales), nf4 (codebook), fp8 (fp32 scales)
SCHEMES = ["int4-g64-asym", "int8", "int3-g64-asym", "nvfp4", "mxfp4", "nf4", "fp8-e4m3"]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(_bits(sa[k]), _bits(sb[k])), k  # bit for bit (NaN and -0.0 included)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1).contiguous().view(torch.uint8)


@pytest.mark.parametrize("scheme", SCHEMES)
def test_text_model_round_trip(tmp_path, scheme):
    model = quantized(TextNet, scheme)
    assert isinstance(model.embed, QuantEmbedding) and isinstance(model.up, QuantLinear)
    path = save(model, tmp_path / "art")
    loaded = load(path, model=seeded(TextNet, seed=123))  # other random weights: all must be overwritten
    assert_same_state(model, loaded)
    assert not loaded.training
    x = text_input()
    assert torch.equal(model(x), loaded(x))


@pytest.mark.parametrize("scheme", ["int8", "int4-g64-asym", "nvfp4"])
def test_conv_model_round_trip(tmp_path, scheme):
    model = quantized(ConvNet, scheme)
    assert isinstance(model.conv1, QuantConv2d) and isinstance(model.head, QuantLinear)
    loaded = load(save(model, tmp_path / "art"), model=seeded(ConvNet, seed=5))
    assert_same_state(model, loaded)  # BatchNorm statistics included
    x = conv_input()
    assert torch.equal(model(x), loaded(x))


def test_static_activation_range_round_trip(tmp_path):
    model = with_static_act(quantized(TextNet, "int8", skip=("up",)), "up")
    loaded = load(save(model, tmp_path / "art"), model=seeded(TextNet))
    assert loaded.up.act is not None and not loaded.up.act.dynamic
    assert loaded.up.act_lo.item() == -1.5 and loaded.up.act_hi.item() == 2.25
    assert_same_state(model, loaded)
    x = text_input()
    assert torch.equal(model(x), loaded(x))


def test_layers_and_float_dtypes_are_recorded(tmp_path):
    model = quantized(TextNet, "int4-g64-asym").half()  # float parts fp16; quantized storage keeps its dtypes
    path = save(model, tmp_path / "art")
    layers = read_manifest(path)["layers"]
    assert set(layers) == {"embed", "up", "down"}
    assert layers["up"]["type"] == "QuantLinear" and layers["up"]["spec"]["group_size"] == 64
    loaded = load(path, model=seeded(TextNet))  # an fp32 skeleton: the saved dtypes win
    assert loaded.norm.weight.dtype == torch.float16 and loaded.up.scale.dtype == torch.float16
    assert_same_state(model, loaded)


@pytest.mark.parametrize("skeleton_tied", [True, False])
def test_tied_weights_are_stored_once_and_retied(tmp_path, skeleton_tied):
    model = quantized(TiedLM, "int4-g32-asym", skip=("emb", "head"))  # only 'mid' quantized
    assert model.head.weight is model.emb.weight
    path = save(model, tmp_path / "art")
    manifest = read_manifest(path)
    assert manifest["tied_tensors"] == {"head.weight": "emb.weight"}
    from safetensors import safe_open

    with safe_open(path / "model.safetensors", "pt") as f:
        assert "head.weight" not in f.keys() and "emb.weight" in f.keys()
    loaded = load(path, model=seeded(TiedLM, tie=skeleton_tied))
    assert loaded.head.weight is loaded.emb.weight
    assert_same_state(model, loaded)
    ids = torch.arange(10)[None]
    assert torch.equal(model(ids), loaded(ids))


def test_quantized_module_shared_under_two_names(tmp_path):
    model = quantized(TiedLM, "int8", skip=("emb", "head"))
    model.mid2 = model.mid  # one quantized module reachable as 'mid' and 'mid2'
    skeleton = seeded(TiedLM)
    skeleton.mid2 = skeleton.mid
    path = save(model, tmp_path / "art")
    manifest = read_manifest(path)
    assert set(manifest["layers"]) == {"mid"} and manifest["shared_modules"] == {"mid2": "mid"}
    loaded = load(path, model=skeleton)
    assert loaded.mid2 is loaded.mid and isinstance(loaded.mid, QuantLinear)
    assert_same_state(model, loaded)


def test_input_scale_round_trip(tmp_path):
    """A linear with AWQ's per-input scale (float32 (in,)) saves bit-exactly and is rebuilt with the buffer."""
    from lowbit.formats import quantize as quantize_tensor
    from lowbit.nn.convert import float_weight, to_quantized
    from lowbit.spec import QuantSpec

    model = quantized(TextNet, "int4-g64-asym", skip=("up",))
    s = torch.exp(0.3 * torch.randn(96, generator=torch.Generator().manual_seed(3)))  # (in,)
    W = float_weight(model.up)
    model.up = to_quantized(model.up, quantize_tensor(W * s, QuantSpec.parse("int4-g64-asym")), input_scale=1 / s)
    model.up.half()  # the input scale keeps float32, like the other storage (the bias becomes fp16)
    path = save(model, tmp_path / "art")
    manifest = read_manifest(path)
    assert manifest["layers"]["up"]["config"]["input_scale"] is True
    assert manifest["layers"]["down"]["config"]["input_scale"] is False
    loaded = load(path, model=seeded(TextNet, seed=9))
    assert loaded.up.input_scale.dtype == torch.float32 and torch.equal(loaded.up.input_scale, 1 / s)
    assert loaded.down.input_scale is None
    assert_same_state(model, loaded)
    x = text_input()
    assert torch.equal(model(x), loaded(x))
    assert manifest["size"]["quantized_bytes"] == sum(m.storage_bytes() for m in (model.embed, model.up, model.down))


def test_load_without_model_builds_the_skeleton_from_source(tmp_path):
    from lowbit.models import tiny_cnn

    model = tiny_cnn()
    lowbit.quantize(model, "int8", progress=False)
    path = save(model, tmp_path / "art", source={"type": "bundled", "name": "tiny-cnn"}, plan="int8")
    assert read_manifest(path)["plan"]["rules"][0]["weight"] == "int8"
    loaded = load(path)
    assert_same_state(model, loaded)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(model(x), loaded(x))


def test_no_source_and_no_model_asks_for_model(tmp_path):
    path = save(quantized(TextNet, "int8"), tmp_path / "art")
    with pytest.raises(InputError, match=r"model="):
        load(path)


def test_skeleton_of_another_architecture_is_refused(tmp_path):
    path = save(quantized(TextNet, "int8"), tmp_path / "art")
    with pytest.raises(InputError, match=r"no such module.*'embed'|'embed'.*no such module"):
        load(path, model=seeded(ConvNet))
    wider = seeded(TextNet)
    wider.up = nn.Linear(96, 81)
    with pytest.raises(InputError, match=r"'up'.*\(81, 96\)"):
        load(path, model=wider)
    wrong_kind = seeded(TextNet)
    wrong_kind.embed = nn.Linear(96, 40)  # same weight shape, another kind
    with pytest.raises(InputError, match=r"QuantEmbedding.*Linear"):
        load(path, model=wrong_kind)


def test_extra_float_tensor_in_skeleton_is_refused(tmp_path):
    path = save(quantized(TextNet, "int8"), tmp_path / "art")
    skeleton = seeded(TextNet)
    skeleton.register_buffer("surprise", torch.zeros(3))
    with pytest.raises(InputError, match=r"surprise"):
        load(path, model=skeleton)


def test_plan_source_and_extra_are_kept(tmp_path):
    model = quantized(TextNet, "int4-g64-asym")
    plan = lowbit.QuantPlan.uniform("int4-g64-asym", skip=())
    path = save(model, tmp_path / "art", plan=plan, extra={"note": "hello", "n": [1, 2]})
    m = read_manifest(path)
    assert lowbit.QuantPlan.from_dict(m["plan"]) == plan
    calibration = m["extra"].pop("calibration")  # what quantize() recorded (lowbit.nn.state.CALIBRATION_ATTR)
    assert calibration == {"schedule": [], "fallbacks": {}}  # round to nearest: nothing observed
    assert m["extra"] == {"note": "hello", "n": [1, 2]} and m["source"] is None
    assert m["lowbit_version"] == lowbit.__version__ and m["format_version"] == 1


def test_refused_skeleton_is_left_untouched(tmp_path):
    path = save(quantized(TextNet, "int8"), tmp_path / "art")
    skeleton = seeded(TextNet)
    skeleton.norm = nn.LayerNorm(80, elementwise_affine=True, bias=False)  # a float tensor missing
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    with pytest.raises(InputError, match=r"1 not in the model \['norm.bias'\]"):
        load(path, model=skeleton)
    assert isinstance(skeleton.up, nn.Linear) and not isinstance(skeleton.up, QuantLinear)
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())
    skeleton.norm = nn.LayerNorm(81)
    with pytest.raises(InputError, match=r"shape\(s\) differ \(norm.weight: file \(80,\), model \(81,\)"):
        load(path, model=skeleton)
    assert isinstance(skeleton.up, nn.Linear)

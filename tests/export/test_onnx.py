"""QDQ ONNX export: lowbit's codes as integer initializers + DequantizeLinear, run and checked in onnxruntime."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.models import load_model
from lowbit.plan import QuantPlan, Rule
from lowbit.quantizer import quantize
from lowbit.spec import ActivationQuant, QuantSpec

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lowbit.export.onnx import (  # noqa: E402
    CausalLMLogits,
    export_onnx,
    export_view,
    onnxruntime_session,
    why_not_onnx,
)


def _linear(spec: str, in_features: int = 72, out_features: int = 40, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = nn.Sequential(nn.Linear(in_features, out_features))
    quantize(m, QuantPlan.uniform(spec), progress=False)
    return m


def _static_act_plan() -> QuantPlan:
    act = ActivationQuant(QuantSpec.parse("int8-tensor"), dynamic=False, observer="minmax")
    return QuantPlan((Rule("*", "int8", "rtn", act),), skip=())


def _w8a8_dynamic() -> QuantPlan:
    return QuantPlan((Rule("*", "int8", "rtn", ActivationQuant(QuantSpec.parse("int8-token"), dynamic=True)),))


def _initializer_types(path) -> dict[str, int]:
    return {t.name: t.data_type for t in onnx.load(str(path)).graph.initializer}


# odd sizes: 72 inputs leave a partial last group of 8 (g32) or of 12 (asym g20 is not a power of two)
@pytest.mark.parametrize("spec", ["int8-ch", "int8-tensor", "int4-g32-asym", "int4-g32", "int3-g16-asym",
                                  "int2-g64-asym", "int4-ch-asym", "int6-g20-asym"])
def test_linear_export_computes_lowbit_reference_exactly(tmp_path, spec):
    m = _linear(spec)
    x = torch.randn(3, 5, 72)
    with torch.no_grad():
        ref = m(x)
        with export_view(m):  # the export modules in eager mode: the same function, bit for bit
            assert torch.equal(m(x), ref)
    r = export_onnx(m, tmp_path / "l.onnx", x[:2], kind="image-classifier", check=x)
    assert r.rel_diff < 1e-6 and r.argmax_agreement == 1.0
    got = onnxruntime_session(tmp_path / "l.onnx").run(None, {"pixel_values": x[:1].numpy()})[0]
    assert np.abs(got - ref[:1].numpy()).max() < 1e-5  # another batch size: the batch stays dynamic
    types = set(_initializer_types(tmp_path / "l.onnx").values())
    bits = QuantSpec.parse(spec).bits
    assert (onnx.TensorProto.UINT4 if bits <= 4 else onnx.TensorProto.UINT8) in types
    ops = [n.op_type for n in onnx.load(str(tmp_path / "l.onnx")).graph.node]
    assert ops.count("DequantizeLinear") == 1 and "MatMul" in ops


def test_causal_lm_export_agrees_with_lowbit_on_other_shapes_and_is_smaller(tmp_path):
    lm = load_model("tiny-llama")
    quantize(lm.model, QuantPlan.uniform("int4-g32-asym", skip=()), progress=False)  # embedding and head too
    ids = torch.randint(0, 256, (3, 21), generator=torch.Generator().manual_seed(0))
    r = export_onnx(lm.model, tmp_path / "lm.onnx", ids[:2, :16], kind="causal-lm", check=ids)
    assert r.rel_diff < 1e-5 and r.argmax_agreement == 1.0 and r.quantized_modules == 16
    assert r.default_argmax_agreement > 0.9  # onnxruntime's int8-activation kernel: close, not exact
    s = onnxruntime_session(tmp_path / "lm.onnx")
    x = torch.randint(0, 256, (1, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = CausalLMLogits(lm.model)(x)
    assert np.abs(s.run(None, {"input_ids": x.numpy()})[0] - ref.numpy()).max() < 1e-4
    float_bytes = sum(p.numel() * 4 for p in load_model("tiny-llama").model.parameters())
    stored = sum(len(t.raw_data) or t.ByteSize() for t in onnx.load(str(tmp_path / "lm.onnx")).graph.initializer)
    assert stored < 0.25 * float_bytes  # 4-bit codes stored packed, with their scales and zero points


def test_static_activation_quantization_becomes_quantize_dequantize_pairs(tmp_path):
    lm = load_model("tiny-cnn")
    calib = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    quantize(lm.model, _static_act_plan(), calib, progress=False)
    n_quant = sum(1 for m in lm.model.modules() if hasattr(m, "act") and m.act is not None)
    x = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    r = export_onnx(lm.model, tmp_path / "cnn.onnx", x[:2], kind="image-classifier", check=x)
    assert r.rel_diff < 1e-5 and r.argmax_agreement == 1.0
    ops = [n.op_type for n in onnx.load(str(tmp_path / "cnn.onnx")).graph.node]
    assert ops.count("QuantizeLinear") == n_quant and ops.count("DequantizeLinear") == 2 * n_quant
    assert "Conv" in ops


def test_awq_input_scale_is_exported(tmp_path):
    lm = load_model("tiny-llama")
    data = [torch.randint(0, 256, (2, 32), generator=torch.Generator().manual_seed(i)) for i in range(2)]
    quantize(lm.model, QuantPlan.uniform("int4-g32-asym", "awq"), data, progress=False)
    assert lm.model.model.layers[0].mlp.down_proj.input_scale is not None
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
    r = export_onnx(lm.model, tmp_path / "awq.onnx", ids, kind="causal-lm")
    assert r.rel_diff < 1e-5


def test_awq_convolution_input_scale_is_exported(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 5)).eval()
    x = torch.randn(6, 4, 8, 8)
    x[:, 0] *= 10
    quantize(model, QuantPlan.uniform("int4-ch-asym", "awq"), [x], progress=False)
    assert model[0].input_scale is not None
    r = export_onnx(model, tmp_path / "conv.onnx", x[:2], kind="image-classifier")
    assert r.rel_diff < 1e-5


@pytest.mark.parametrize("plan,message", [
    (QuantPlan.uniform("fp8-e4m3"), "integer formats only"),
    (_w8a8_dynamic(), "dynamic activation quantization"),
])
def test_what_onnx_cannot_hold_is_refused_naming_the_module(tmp_path, plan, message):
    lm = load_model("tiny-llama")
    quantize(lm.model, plan, progress=False)
    with pytest.raises(InputError, match=message) as e:
        export_onnx(lm.model, tmp_path / "x.onnx", torch.zeros(2, 8, dtype=torch.long), kind="causal-lm")
    assert "model.layers.0.self_attn.q_proj" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_group_quantized_conv_and_released_weights_are_refused():
    conv = nn.Sequential(nn.Conv2d(8, 8, 3))
    quantize(conv, QuantPlan.uniform("int8-g8"), progress=False)
    assert "group scales are not representable" in why_not_onnx(conv[0])
    from lowbit.kernels import use_kernels

    m = _linear("int4-g32", in_features=64, out_features=48)
    use_kernels(m, keep_reference=False)
    assert m[0].storage_released
    assert "handed to a kernel" in why_not_onnx(m[0])


def test_existing_file_is_kept_and_a_failed_check_leaves_nothing(tmp_path):
    m = _linear("int8-ch")
    x = torch.randn(2, 72)
    dest = tmp_path / "l.onnx"
    dest.write_bytes(b"keep")
    with pytest.raises(InputError, match="exists"):
        export_onnx(m, dest, x, kind="image-classifier")
    assert dest.read_bytes() == b"keep"
    with pytest.raises(InputError, match="differs from lowbit's"):
        export_onnx(m, tmp_path / "strict.onnx", x, kind="image-classifier", rtol=0.0, check=torch.randn(2, 72) * 1e3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.onnx"]


def test_cli_export_onnx_from_a_saved_folder(tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.io import save

    lm = load_model("tiny-llama")
    quantize(lm.model, QuantPlan.uniform("int4-g32-asym"), progress=False)
    save(lm.model, tmp_path / "q", source=lm.source)
    assert main(["export", str(tmp_path / "q"), "--format", "onnx", "--out", str(tmp_path / "q.onnx")]) == 0
    out = capsys.readouterr().out
    assert "argmax agreement 100.00%" in out
    assert onnxruntime_session(tmp_path / "q.onnx").get_inputs()[0].name == "input_ids"
    lm = load_model("tiny-llama")
    quantize(lm.model, _w8a8_dynamic(), progress=False)
    save(lm.model, tmp_path / "w8a8", source=lm.source)
    assert main(["export", str(tmp_path / "w8a8"), "--format", "onnx", "--out", str(tmp_path / "w.onnx")]) == 2
    assert "dynamic activation quantization" in capsys.readouterr().err
    assert not (tmp_path / "w.onnx").exists()


def test_a_model_running_kernels_is_checked_against_its_reference_path(tmp_path):
    from lowbit.kernels import kernel_name, use_kernels

    m = _linear("int4-g32", in_features=64, out_features=48)
    from lowbit.kernels import KERNELS

    use_kernels(m, tuple(k for k in KERNELS if k.name == "int4-weight-bf16"))  # bf16 inside: ~1e-2 from the reference
    assert kernel_name(m[0]) == "int4-weight-bf16"
    r = export_onnx(m, tmp_path / "k.onnx", torch.randn(2, 64), kind="image-classifier")
    assert r.rel_diff < 1e-6
    assert kernel_name(m[0]) == "int4-weight-bf16"  # the kernel is attached again afterwards


def test_conv_input_padding_is_exported(tmp_path):
    m = nn.Sequential(nn.Conv2d(4, 8, 3, stride=2)).eval()
    quantize(m, _static_act_plan(), [torch.randn(2, 4, 12, 12)], progress=False)
    m[0].input_padding = (0, 1, 0, 1)  # TF-style "same" padding, as EfficientNet-Lite's convolutions have
    x = torch.randn(3, 4, 12, 12)
    r = export_onnx(m, tmp_path / "pad.onnx", x[:2], kind="image-classifier", check=x)
    assert r.rel_diff < 1e-5 and r.inputs == (3, 4, 12, 12)

"""ONNX files converted to torch (lowbit.models.onnx_torch): equal to onnxruntime, bad files refused clearly,
.onnx paths as model sources, and quantized converted models through save/load."""

from __future__ import annotations

import importlib.util
import sys
import warnings

import numpy as np
import pytest
import torch
from torch import nn

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
if importlib.util.find_spec("onnx2torch") is None:  # never imported here directly: it would import torchvision
    pytest.skip("onnx2torch is not installed (pip install --no-deps onnx2torch==1.5.15)", allow_module_level=True)

from onnx import TensorProto, helper, numpy_helper  # noqa: E402

import lowbit  # noqa: E402
from lowbit.errors import InputError  # noqa: E402
from lowbit.models import build_skeleton, load_model, load_tokenizer, resolve_source  # noqa: E402
from lowbit.models.onnx_torch import load_onnx, onnx_kind, read_onnx  # noqa: E402


class TinyNet(nn.Module):
    """conv -> tokens -> layernorm -> linear -> gelu -> linear -> mean -> softmax: (B, 3, 8, 8) -> (B, 5)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 5)

    def forward(self, x):
        h = self.conv(x).flatten(2).transpose(1, 2)  # (B, 16, 8)
        h = nn.functional.gelu(self.fc1(self.norm(h)))  # (B, 16, 16)
        return torch.softmax(self.fc2(h).mean(1), dim=-1)  # (B, 5)


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    """A tiny net exported by torch (TorchScript exporter, opset 17: LayerNormalization, MatMul + Add)."""
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        net = TinyNet().eval()
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated; it is also the fast one (~1 s)
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(net, (torch.randn(2, 3, 8, 8),), str(path), dynamo=False, opset_version=17,
                          input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
    return path


def _ort(path, *inputs):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs)})


def _save(tmp_path, nodes, inputs, outputs, initializers=(), opset=18, name="m.onnx"):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _info(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, shape)


def _init(name, array):
    return numpy_helper.from_array(np.asarray(array, dtype=np.float32 if np.asarray(array).dtype.kind == "f"
                                              else np.int64), name)


# ---- conversion ---------------------------------------------------------------------------------------


def test_tiny_model_equals_onnxruntime(tiny_onnx):
    model = load_onnx(tiny_onnx)
    assert isinstance(model, torch.fx.GraphModule) and not model.training
    types = [type(m) for m in model.modules()]
    assert types.count(nn.Conv2d) == 1 and types.count(nn.Linear) == 2  # both MatMul + Add became Linear
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = model(x)
    (want,) = _ort(tiny_onnx, x)
    assert got.shape == (3, 5)
    assert np.abs(got.numpy() - want).max() < 1e-5
    assert "torchvision" not in sys.modules and "torchvision.ops" not in sys.modules


def test_matmul_by_constant_becomes_linear_and_dynamic_matmul_stays(tmp_path):
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["xw"], name="proj/MatMul"),
             helper.make_node("Add", ["b", "xw"], ["h"], name="proj/Add"),  # bias first: either order folds
             helper.make_node("Transpose", ["h"], ["ht"], perm=[0, 2, 1], name="t"),
             helper.make_node("MatMul", ["h", "ht"], ["y"], name="scores")]
    path = _save(tmp_path, nodes, [_info("x", [2, 3, 4])], [_info("y", [2, 3, 3])],
                 [_init("W", rng.standard_normal((4, 5))), _init("b", rng.standard_normal(5))], opset=14)
    model = load_onnx(path)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [n for n, _ in linears] == ["proj/MatMul"] and linears[0][1].bias is not None
    assert sum(type(m).__name__ == "OnnxMatMul" for m in model.modules()) == 1
    assert not [k for k in model.state_dict() if k.startswith("initializers.")]  # W and b not kept twice
    x = torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = model(x)
    assert np.abs(got.numpy() - _ort(path, x)[0]).max() < 1e-5


def test_opset18_split_and_resize(tmp_path):
    # Split-18 by num_outputs: 5 channels -> 2, 2, 1 (the last chunk smaller); each resized x2, concatenated again
    nodes = [helper.make_node("Split", ["x"], ["a", "b", "c"], axis=1, num_outputs=3, name="split")]
    nodes += [helper.make_node("Resize", [p, "", "scales"], [f"r{p}"], mode="linear", name=f"up_{p}") for p in "abc"]
    nodes += [helper.make_node("Concat", ["ra", "rb", "rc"], ["y"], axis=1, name="cat")]
    path = _save(tmp_path, nodes, [_info("x", [1, 5, 4, 4])], [_info("y", [1, 5, 8, 8])],
                 [_init("scales", [1.0, 1.0, 2.0, 2.0])], opset=18)
    model = load_onnx(path)
    x = torch.randn(1, 5, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = model(x)
    (want,) = _ort(path, x)
    assert tuple(got.shape) == want.shape == (1, 5, 8, 8)
    assert np.abs(got.numpy() - want).max() < 1e-5


def test_resize18_attributes_beyond_opset13_refused(tmp_path):
    nodes = [helper.make_node("Resize", ["x", "", "scales"], ["y"], mode="linear", antialias=1, name="smooth")]
    path = _save(tmp_path, nodes, [_info("x", [1, 1, 4, 4])], [_info("y", [1, 1, 2, 2])],
                 [_init("scales", [1.0, 1.0, 0.5, 0.5])], opset=18)
    with pytest.raises(InputError, match="Resize node 'smooth'.*antialias"):
        load_onnx(path)


def test_reshape_allowzero_converted_where_no_tensor_is_empty(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1, name="flat")]
    path = _save(tmp_path, nodes, [_info("x", [2, 3, 4])], [_info("y", [2, 12])], [_init("shape", [2, -1])], opset=14)
    x = torch.randn(2, 3, 4)
    with torch.no_grad():
        assert torch.equal(load_onnx(path)(x), x.reshape(2, 12))


def test_reshape_allowzero_refused_with_a_zero_sized_tensor(tmp_path):
    nodes = [helper.make_node("Reshape", ["x", "shape"], ["y"], allowzero=1, name="flat")]
    path = _save(tmp_path, nodes, [_info("x", [0, 4])], [_info("y", [0, 4])], [_init("shape", [0, 4])], opset=14)
    with pytest.raises(InputError, match=r"flat.*allowzero=1.*zero-sized"):
        load_onnx(path)


# ---- bad files ----------------------------------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="no-such.onnx: no such ONNX file"):
        load_onnx(tmp_path / "no-such.onnx")


@pytest.mark.parametrize("content", [b"\x08\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01garbage", b"hello, not a model\n"])
def test_not_an_onnx_model(tmp_path, content):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(InputError, match="bad.onnx: not an ONNX model"):
        load_onnx(path)


def test_unconvertible_operators_named(tmp_path):
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="ok"),
             helper.make_node("Hardmax", ["r"], ["h"], name="pick"),
             helper.make_node("MyOp", ["h"], ["y"], domain="com.example", name="custom")]
    graph = helper.make_graph(nodes, "g", [_info("x", [2, 3])], [_info("y", [2, 3])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14), helper.make_opsetid("com.example", 1)],
                              ir_version=8)
    path = tmp_path / "ops.onnx"
    onnx.save(model, str(path))
    with pytest.raises(InputError, match=r"ops.onnx: onnx2torch cannot convert 2 node\(s\): Hardmax \(opset 14\): pick; "
                                         r"com.example::MyOp \(opset 1\): custom"):
        load_onnx(path)


def test_nms_refused_as_needing_torchvision(tmp_path):
    boxes, scores = _info("boxes", [1, 4, 4]), _info("scores", [1, 1, 4])
    out = helper.make_tensor_value_info("sel", TensorProto.INT64, [None, 3])
    path = _save(tmp_path, [helper.make_node("NonMaxSuppression", ["boxes", "scores"], ["sel"], name="nms")],
                 [boxes, scores], [out], opset=14)
    with pytest.raises(InputError, match="NonMaxSuppression.*nms.*needs torchvision"):
        load_onnx(path)
    assert "torchvision" not in sys.modules


def test_missing_external_data(tiny_onnx, tmp_path):
    proto = onnx.load(str(tiny_onnx))
    path = tmp_path / "ext.onnx"
    onnx.save(proto, str(path), save_as_external_data=True, location="ext.weights", size_threshold=0)
    assert load_onnx(path) is not None  # present: loads
    (tmp_path / "ext.weights").unlink()
    with pytest.raises(InputError, match=r"ext.onnx: .*external data file\(s\) that are missing: ext.weights"):
        load_onnx(path)


# ---- as a model source --------------------------------------------------------------------------------


def test_onnx_path_is_a_model_source(tiny_onnx):
    src = resolve_source(str(tiny_onnx))
    assert src == {"type": "onnx", "path": str(tiny_onnx.resolve())}
    assert resolve_source(src) == src
    lm = load_model(tiny_onnx)
    assert lm.kind == "image-classifier" and lm.tokenizer is None and lm.source == src
    assert load_tokenizer(src) is None
    skeleton = build_skeleton(src)
    assert {k: v.shape for k, v in skeleton.state_dict().items()} == {k: v.shape for k, v in lm.model.state_dict().items()}


def test_kind_from_input_and_output_ranks(tmp_path):
    conv = [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    path = _save(tmp_path, conv, [_info("x", ["n", 3, 8, 8])], [_info("y", ["n", 1, 8, 8])],
                 [_init("w", np.zeros((1, 3, 3, 3)))], opset=14)
    assert onnx_kind(read_onnx(path)) == "image-to-image"
    flat = [helper.make_node("Relu", ["x"], ["y"], name="r")]
    other = _save(tmp_path, flat, [_info("x", [2, 3])], [_info("y", [2, 3])], opset=14, name="vec.onnx")
    assert onnx_kind(read_onnx(other)) == "onnx-model"


def test_quantized_converted_model_round_trips(tiny_onnx, tmp_path):
    lm = load_model(tiny_onnx)
    lowbit.quantize(lm.model, "int8", progress=False)
    assert sum(type(m).__name__ == "QuantLinear" for m in lm.model.modules()) == 2
    x = torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        want = lm.model(x)
    lowbit.save(lm.model, tmp_path / "q", source=lm.source)
    loaded = lowbit.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(x), want)

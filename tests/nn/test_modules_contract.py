"""The contract every quantized module obeys, parametrized over module kinds and specs.

Reference path (the oracle): float op with ``dequantized_weight()``; quantized ~ float by an SQNR bound;
dtype kept; ``.to()`` never casts storage; state dict round trip into a module rebuilt from its
``layer_record``; no float copy of the weight; storage size by hand; activation quantization.
"""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InputError
from lowbit.formats import fake_quantize, grid_shape, quantize
from lowbit.nn import QuantConv1d, QuantConv2d, QuantEmbedding, QuantLinear, QuantModule
from lowbit.nn.convert import float_weight, from_layer_record, is_quantizable, layer_record, to_quantized
from lowbit.spec import ActivationQuant, QuantSpec


def _randn(*shape: int):
    return lambda g, dt: torch.randn(*shape, generator=g).to(dt)


# name -> (float module builder, input builder); inputs take a generator and a dtype
MODULES = {
    "linear": (lambda: nn.Linear(48, 24), _randn(2, 5, 48)),
    "linear-nobias": (lambda: nn.Linear(40, 16, bias=False), _randn(7, 40)),
    "conv1d": (lambda: nn.Conv1d(6, 8, 3, stride=2, padding=1), _randn(2, 6, 20)),
    "conv2d": (lambda: nn.Conv2d(4, 8, 3, padding=1), _randn(2, 4, 10, 10)),
    "conv2d-depthwise": (lambda: nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8), _randn(2, 8, 9, 9)),
    "conv2d-grouped-strided": (lambda: nn.Conv2d(6, 4, (3, 5), stride=(2, 1), padding=(1, 2), dilation=(1, 2),
                                                 groups=2, bias=False), _randn(1, 6, 11, 13)),
    "conv2d-same": (lambda: nn.Conv2d(3, 5, 3, padding="same"), _randn(2, 3, 8, 8)),
    "embedding": (lambda: nn.Embedding(50, 32, padding_idx=0),
                  lambda g, dt: torch.randint(0, 50, (3, 7), generator=g)),
}
SPECS = ["int8", "int4-g16-asym", "int3-g8-asym-sbf16", "int4-g16-asym-sfp8", "nvfp4", "mxfp4", "fp8-e4m3",
         "ternary"]
QUANT_TYPE = {"linear": QuantLinear, "conv1d": QuantConv1d, "conv2d": QuantConv2d, "embedding": QuantEmbedding}


def _build(kind: str, scheme: str, act: ActivationQuant | None = None, seed: int = 0):
    """(float module, its quantized twin, input builder) with weights fixed by ``seed``."""
    make, inputs = MODULES[kind]
    with torch.random.fork_rng(devices=[]):  # nn's default init draws from the global RNG; leave it as it was
        torch.manual_seed(seed)
        fm = make().eval()
        if getattr(fm, "bias", None) is not None:
            nn.init.normal_(fm.bias, std=0.1)
    spec = QuantSpec.parse(scheme)
    qm = to_quantized(fm, quantize(float_weight(fm), spec), act).eval()
    return fm, qm, inputs


def _reference(qm: QuantModule, x: torch.Tensor) -> torch.Tensor:
    """The oracle: the float op on the dequantized weight (and fake-quantized input)."""
    if isinstance(qm, QuantEmbedding):
        return F.embedding(x, qm.dequantized_weight(), qm.padding_idx)
    w = qm.dequantized_weight(x.dtype)
    b = None if qm.bias is None else qm.bias.to(x.dtype)
    if getattr(qm, "input_padding", None) is not None:  # TF-style 'SAME' convs pad before quantizing
        x = F.pad(x, qm.input_padding)
    x = qm.quantize_input(x)
    if isinstance(qm, QuantLinear):
        return F.linear(x, w, b)
    conv = F.conv1d if isinstance(qm, QuantConv1d) else F.conv2d
    return conv(x, w, b, qm.stride, qm.padding, qm.dilation, qm.groups)


kinds = pytest.mark.parametrize("kind", list(MODULES))
specs = pytest.mark.parametrize("scheme", SPECS)


@kinds
@specs
def test_output_equals_the_reference(kind, scheme, gen):
    fm, qm, inputs = _build(kind, scheme)
    assert isinstance(qm, QUANT_TYPE[kind.split("-")[0]])
    x = inputs(gen, torch.float32)
    with torch.no_grad():
        y = qm(x)
        assert torch.equal(y, _reference(qm, x))
        assert y.shape == fm(x).shape
    # the dequantized weight is exactly the fake-quantized float weight
    assert torch.equal(qm.dequantized_weight(), fake_quantize(float_weight(fm).float(), qm.spec))


@kinds
@pytest.mark.parametrize("scheme, floor", [("int8", 35.0), ("fp8-e4m3", 25.0), ("int4-g16-asym", 14.0)])
def test_output_close_to_float(kind, scheme, floor, gen, sqnr):
    fm, qm, inputs = _build(kind, scheme)
    x = inputs(gen, torch.float32)
    with torch.no_grad():
        got = sqnr(fm(x), qm(x))
    assert got > floor, f"{kind} {scheme}: {got:.1f} dB"


@kinds
@pytest.mark.parametrize("scheme", ["int8", "int4-g16-asym", "nvfp4"])
def test_dtype_is_kept(kind, scheme, gen):
    _, qm, inputs = _build(kind, scheme)
    x32 = inputs(gen, torch.float32)
    with torch.no_grad():
        y32 = qm(x32)
        if kind == "embedding":
            # ids carry no float dtype: QuantEmbedding always dequantizes its table to float32 (even after
            # .to(torch.bfloat16), unlike nn.Embedding: a known limitation)
            assert y32.dtype == torch.float32 and qm.to(torch.bfloat16)(x32).dtype == torch.float32
            return
        x16 = x32.to(torch.bfloat16)
        y16 = qm(x16)
    assert y32.dtype == torch.float32 and y16.dtype == torch.bfloat16
    assert torch.equal(y16, _reference(qm, x16))
    assert torch.allclose(y16.float(), y32, atol=0.05 * float(y32.abs().max()), rtol=0.05)


def _storage(qm: QuantModule) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in qm.state_dict().items() if k != "bias"}


@kinds
@pytest.mark.parametrize("scheme", ["int8", "int4-g16-asym", "nvfp4", "mxfp4", "fp8-e4m3"])
@pytest.mark.parametrize("move", ["cpu", "float64", "bfloat16", "half", "float"])
def test_to_never_casts_storage(kind, scheme, move, gen):
    """``.to(dtype)`` / ``.half()`` would round fp32/fp16 scales and the global scale; storage keeps its dtype."""
    _, qm, inputs = _build(kind, scheme)
    before, w_before, nbytes = _storage(qm), qm.dequantized_weight(), qm.storage_bytes()
    m = copy.deepcopy(qm)
    moved = {"cpu": lambda: m.to("cpu"), "float64": lambda: m.to(torch.float64),
             "bfloat16": lambda: m.to(dtype=torch.bfloat16), "half": m.half, "float": m.float}[move]()
    assert moved is m
    after = _storage(m)
    assert after.keys() == before.keys()
    for k in before:
        assert after[k].dtype == before[k].dtype and torch.equal(after[k], before[k]), k
    assert m.qweight.dtype == torch.uint8
    assert torch.equal(m.dequantized_weight(), w_before) and m.storage_bytes() == nbytes
    bias = getattr(m, "bias", None)
    if bias is not None and move in ("float64", "bfloat16", "half"):
        assert bias.dtype == {"float64": torch.float64, "bfloat16": torch.bfloat16, "half": torch.float16}[move]
    x = inputs(gen, torch.float32)
    with torch.no_grad():
        if bias is None or move in ("cpu", "float", "float64"):
            assert torch.equal(m(x), qm(x))
        else:  # only the bias was rounded, like any float module's
            assert torch.allclose(m(x), qm(x), atol=1e-2, rtol=0)


@kinds
@specs
def test_state_dict_round_trip(kind, scheme, gen):
    _, qm, inputs = _build(kind, scheme)
    record = json.loads(json.dumps(layer_record(qm)))  # JSON-able
    fresh = from_layer_record(record)
    assert type(fresh) is type(qm) and fresh.spec == qm.spec
    x = inputs(gen, torch.float32)
    with torch.no_grad():
        assert not torch.equal(fresh(x), qm(x)), "an empty module must not already compute the same thing"
        fresh.load_state_dict(qm.state_dict(), strict=True)
        assert torch.equal(fresh(x), qm(x))
    for k, v in qm.state_dict().items():
        assert fresh.state_dict()[k].dtype == v.dtype


@kinds
@specs
def test_no_float_copy_of_the_weight(kind, scheme):
    fm, qm, _ = _build(kind, scheme)
    numel = fm.weight.numel()
    tensors = dict(qm.named_parameters()) | dict(qm.named_buffers())
    assert "weight" not in tensors
    for name, t in tensors.items():
        if t.is_floating_point():
            assert t.numel() < numel and t.shape != fm.weight.shape, name
    assert qm.qweight.dtype == torch.uint8 and qm.qweight.dim() == 1
    # storage is at most the spec's bits per element plus scale overhead: never the float weight's 32
    assert qm.bits_per_weight() < 16


# (kind, scheme, qweight bytes, scale bytes, zero-point bytes, global-scale bytes), counted by hand
STORAGE = [
    ("linear", "int8", 48 * 24, 24 * 2, 0, 0),  # per channel: 24 fp16 scales
    ("linear", "int4-g16-asym", 48 * 24 // 2, 24 * 3 * 2, 24 * 3, 0),  # 3 groups of 16 per row
    ("linear", "int3-g8-asym-sbf16", 48 * 24 * 3 // 8, 24 * 6 * 2, 24 * 6, 0),
    ("linear", "nvfp4", 48 * 24 // 2, 24 * 3, 0, 4),  # fp8 scale per 16 + one fp32
    ("linear", "mxfp4", 48 * 24 // 2, 24 * 2, 0, 0),  # e8m0 per 32: groups of 32 + 16
    ("linear", "fp8-e4m3", 48 * 24, 24 * 4, 0, 0),  # fp32 per channel
    ("linear", "ternary", 48 * 24 // 4, 24 * 2, 0, 0),  # 2-bit codes
    ("conv2d-depthwise", "int4-g16-asym", 8 * 9 // 2, 8 * 1 * 2, 8, 0),  # 9 per filter: one short group
    ("conv1d", "int3-g8-asym-sbf16", math.ceil(8 * 6 * 3 * 3 / 8), 8 * 3 * 2, 8 * 3, 0),  # 18 per filter
    ("conv2d-grouped-strided", "int8", 4 * 3 * 15, 4 * 2, 0, 0),  # weight (4, 6 // 2, 3, 5)
    ("embedding", "int8", 50 * 32, 50 * 2, 0, 0),
    ("embedding", "nvfp4", 50 * 32 // 2, 50 * 2, 0, 4),
]


@pytest.mark.parametrize("kind, scheme, codes, scales, zps, glob", STORAGE)
def test_storage_bytes_by_hand(kind, scheme, codes, scales, zps, glob):
    fm, qm, _ = _build(kind, scheme)
    assert qm.qweight.numel() == codes
    assert qm.scale.numel() * qm.scale.element_size() == scales
    assert (0 if qm.zero_point is None else qm.zero_point.numel()) == zps
    assert (0 if qm.global_scale is None else qm.global_scale.numel() * 4) == glob
    total = codes + scales + zps + glob
    assert qm.storage_bytes() == total
    assert qm.bits_per_weight() == pytest.approx(8 * total / fm.weight.numel())


def test_bits_per_weight_examples():
    assert _build("linear", "int8")[1].bits_per_weight() == pytest.approx(8 + 16 / 48)
    assert _build("linear", "int4-g16-asym")[1].bits_per_weight() == pytest.approx(4 + 16 / 16 + 8 / 16)
    assert _build("linear", "mxfp4")[1].bits_per_weight() == pytest.approx(4 + 2 * 8 / 48)


# ---- activation quantization ----------------------------------------------------------------------------


def test_static_activation_quantization():
    act = ActivationQuant("int8-tensor", dynamic=False)
    fm, qm, inputs = _build("linear", "int8", act)
    assert qm.act_lo is not None and "act_lo" in qm.state_dict()
    g = torch.Generator().manual_seed(1)
    x = inputs(g, torch.float32)
    lo, hi = x.min().reshape(1, 1), x.max().reshape(1, 1)
    qm.set_activation_range(lo, hi)
    with torch.no_grad():
        y = qm(x)
        xq = fake_quantize(x.reshape(-1, 48), act.spec, lo, hi).reshape(x.shape)
        w = qm.dequantized_weight()
        assert torch.equal(y, F.linear(xq, w, qm.bias))
        # inputs move by at most half a step; the output by at most that times the weight row norms
        step = float(torch.maximum(lo.abs(), hi.abs())) / 127
        assert (xq - x).abs().max() <= step / 2 * 1.001
        bound = step / 2 * w.abs().sum(1) * 1.001
        assert ((y - F.linear(x, w, qm.bias)).abs() <= bound).all()
        # a narrower range clips: inputs beyond it no longer reach the layer
        qm.set_activation_range(torch.tensor(-0.5), torch.tensor(0.5))
        assert float(qm.quantize_input(x).abs().max()) <= 0.5 * (1 + 1e-3) * 128 / 127
        assert not torch.equal(qm(x), y)


def test_dynamic_per_token_activation_quantization():
    act = ActivationQuant("int8-token")
    fm, qm, inputs = _build("linear", "int8", act)
    assert qm.act_lo is None and "act_lo" not in qm.state_dict()
    g = torch.Generator().manual_seed(1)
    x = inputs(g, torch.float32) * torch.logspace(-2, 2, 5)[None, :, None]  # tokens of very different size
    with torch.no_grad():
        y = qm(x)
        xq = qm.quantize_input(x)
        w = qm.dequantized_weight()
        assert torch.equal(y, F.linear(xq, w, qm.bias))
        # each token gets its own scale: its error is relative to its own size
        step = x.abs().amax(-1, keepdim=True) / 127
        assert ((xq - x).abs() <= step / 2 * 1.001).all()
        assert torch.equal(xq, fake_quantize(x.reshape(-1, 48), act.spec).reshape(x.shape))
        ref = F.linear(x, w, qm.bias)
        assert ((y - ref).abs() <= (step / 2 * 1.001) @ w.abs().sum(1, keepdim=True).T).all()


def test_static_activation_quantization_on_a_convolution(sqnr):
    act = ActivationQuant("int8-tensor", dynamic=False)
    fm, qm, inputs = _build("conv2d", "int8", act)
    x = inputs(torch.Generator().manual_seed(2), torch.float32)
    qm.set_activation_range(x.min(), x.max())
    with torch.no_grad():
        assert torch.equal(qm(x), _reference(qm, x))
        assert sqnr(fm(x), qm(x)) > 30


def test_activation_quantization_errors():
    _, qm, _ = _build("linear", "int8")
    with pytest.raises(ValueError, match="no static activation"):
        qm.set_activation_range(torch.tensor(-1.0), torch.tensor(1.0))
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(InputError, match="per tensor"):
        to_quantized(conv, quantize(conv.weight.detach(), QuantSpec.parse("int8")), ActivationQuant("int8-token"))
    emb = nn.Embedding(10, 8)
    with pytest.raises(InputError, match="embeddings"):
        to_quantized(emb, quantize(emb.weight.detach(), QuantSpec.parse("int8")), ActivationQuant("int8-token"))


# ---- conversion ----------------------------------------------------------------------------------------


def test_gpt2_conv1d_becomes_a_quant_linear(sqnr):
    pytorch_utils = pytest.importorskip("transformers.pytorch_utils")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        conv = pytorch_utils.Conv1D(24, 48)  # nf=24 outputs, nx=48 inputs; weight stored (in, out)
        nn.init.normal_(conv.weight, std=0.05)
        nn.init.normal_(conv.bias, std=0.1)
    assert conv.weight.shape == (48, 24) and is_quantizable(conv)
    w = float_weight(conv)
    assert w.shape == (24, 48) and torch.equal(w, conv.weight.t())
    spec = QuantSpec.parse("int8")
    qm = to_quantized(conv, quantize(w, spec))
    assert isinstance(qm, QuantLinear) and (qm.in_features, qm.out_features) == (48, 24)
    x = torch.randn(2, 5, 48, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y, ref = qm(x), conv(x)
        assert torch.allclose(y, x @ fake_quantize(conv.weight.t(), spec).T + conv.bias, atol=1e-5)
        assert sqnr(ref, y) > 35
        # same float function: the unquantized Conv1D is exactly a Linear with the transposed weight
        assert torch.allclose(ref, F.linear(x, w, conv.bias), atol=1e-6)


def test_conversion_errors():
    with pytest.raises(InputError, match="LayerNorm"):
        to_quantized(nn.LayerNorm(8), quantize(torch.randn(8, 8), QuantSpec.parse("int8")))
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect")
    with pytest.raises(InputError, match="reflect"):
        to_quantized(conv, quantize(conv.weight.detach(), QuantSpec.parse("int8")))
    assert not is_quantizable(nn.LayerNorm(8)) and not is_quantizable(nn.Sequential())
    with pytest.raises(InputError, match="QuantNothing"):
        from_layer_record({"type": "QuantNothing", "config": {}, "spec": {}, "act": None})
    with pytest.raises(InputError, match="4-D weight"):
        QuantConv2d((4, 3, 3), True, QuantSpec.parse("int8"), (1, 1), (0, 0), (1, 1), 1)


def test_set_quantized_weight_checks_spec_and_shape():
    _, qm, _ = _build("linear", "int8")
    with pytest.raises(ValueError, match="does not fit"):
        qm.set_quantized_weight(quantize(torch.randn(24, 48), QuantSpec.parse("int4")))
    with pytest.raises(ValueError, match="does not fit"):
        qm.set_quantized_weight(quantize(torch.randn(24, 40), QuantSpec.parse("int8")))


def test_repr_names_the_formats():
    act = ActivationQuant("int8-token")
    _, qm, _ = _build("linear", "int4-g16-asym", act)
    assert "weight=int4-g16-asym" in repr(qm) and "act=int8-token:dynamic" in repr(qm)
    _, qc, _ = _build("conv2d-depthwise", "int8")
    assert "groups=8" in repr(qc) and "weight=int8" in repr(qc)
    assert grid_shape(qc.spec, qc.weight_shape) == tuple(qc.scale.shape)

"""QuantLinear's optional per-input-feature scale (AWQ's 1 / s): forward, effective weight, storage, records."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.errors import InputError
from lowbit.evaluation.layers import layer_table, sqnr_db
from lowbit.nn.size import model_size
from lowbit.formats import fake_quantize, quantize
from lowbit.nn import QuantLinear, to_quantized
from lowbit.nn.convert import from_layer_record, layer_record
from lowbit.spec import ActivationQuant, QuantSpec


def _scaled(scheme: str = "int4-g16-asym", act: ActivationQuant | None = None, bias: bool = True):
    """(float linear 48->24, its quantized twin with input_scale = 1 / s, s): ``q`` quantizes ``W * s``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lin = nn.Linear(48, 24, bias=bias).eval()
    g = torch.Generator().manual_seed(1)
    s = torch.exp(0.3 * torch.randn(48, generator=g))  # (in,) positive, around 1
    q = quantize(lin.weight.detach() * s, QuantSpec.parse(scheme))
    return lin, to_quantized(lin, q, act, input_scale=1.0 / s).eval(), s


def _x(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2))


def test_forward_multiplies_the_input_first():
    lin, qm, s = _scaled()
    assert isinstance(qm, QuantLinear) and qm.input_scale.dtype == torch.float32 and qm.input_scale.shape == (48,)
    assert torch.equal(qm.input_scale, 1.0 / s)
    x = _x(3, 5, 48)
    with torch.no_grad():
        y = qm(x)
        assert torch.equal(y, F.linear(x * qm.input_scale, qm.dequantized_weight(), qm.bias))
        W_eff = qm.effective_weight()
        assert torch.equal(W_eff, qm.dequantized_weight() * qm.input_scale)
        assert torch.allclose(y, x @ W_eff.t() + qm.bias, rtol=1e-5, atol=1e-5)
        assert sqnr_db(lin(x), y) > 18  # the module applies ~W: dequantize(q) / s


def test_activation_quantization_sees_the_scaled_input():
    act = ActivationQuant("int8-token")
    _, qm, _ = _scaled(act=act)
    x = _x(7, 48)
    with torch.no_grad():
        xs = x * qm.input_scale
        assert torch.equal(qm(x), F.linear(fake_quantize(xs, act.spec), qm.dequantized_weight(), qm.bias))


def test_without_input_scale_nothing_changes():
    lin = nn.Linear(16, 8)
    qm = to_quantized(lin, quantize(lin.weight.detach(), QuantSpec.parse("int8")))
    assert qm.input_scale is None and "input_scale" not in qm.state_dict()
    assert layer_record(qm)["config"]["input_scale"] is False
    assert torch.equal(qm.effective_weight(), qm.dequantized_weight())
    # records written before input scales existed have no such key
    rec = layer_record(qm)
    del rec["config"]["input_scale"]
    assert from_layer_record(rec).input_scale is None


def test_state_dict_round_trip_through_the_record():
    _, qm, _ = _scaled("int3-g8-asym-sbf16", act=ActivationQuant("int8-tensor", dynamic=False))
    qm.set_activation_range(torch.tensor(-3.0), torch.tensor(3.0))
    rec = json.loads(json.dumps(layer_record(qm)))
    assert rec["config"]["input_scale"] is True
    fresh = from_layer_record(rec)
    assert torch.equal(fresh.input_scale, torch.ones(48))
    fresh.load_state_dict(qm.state_dict(), strict=True)
    assert torch.equal(fresh.input_scale, qm.input_scale) and "input_scale" in repr(fresh)
    x = _x(4, 48)
    with torch.no_grad():
        assert torch.equal(fresh(x), qm(x))


@pytest.mark.parametrize("move", ["bfloat16", "half", "float64"])
def test_to_dtype_keeps_the_input_scale(move):
    _, qm, _ = _scaled()
    before = qm.input_scale.clone()
    m = copy.deepcopy(qm)
    {"bfloat16": lambda: m.to(torch.bfloat16), "half": m.half, "float64": lambda: m.to(torch.float64)}[move]()
    assert m.input_scale.dtype == torch.float32 and torch.equal(m.input_scale, before)
    assert m.bias.dtype == {"bfloat16": torch.bfloat16, "half": torch.float16, "float64": torch.float64}[move]
    x = _x(2, 48).to(m.bias.dtype)
    with torch.no_grad():
        y = m(x)
    assert y.dtype == x.dtype
    assert torch.equal(y, F.linear(x * before.to(x.dtype), m.dequantized_weight(x.dtype), m.bias))


def test_storage_counts_the_input_scale():
    lin, qm, _ = _scaled("int4-g16-asym")
    plain = to_quantized(lin, quantize(lin.weight.detach(), QuantSpec.parse("int4-g16-asym")))
    assert qm.storage_bytes() == plain.storage_bytes() + 48 * 4
    assert qm.bits_per_weight() == pytest.approx(8 * (plain.storage_bytes() + 48 * 4) / (24 * 48))
    size = model_size(nn.ModuleDict({"fc": qm}))  # counted once: as weight storage, not as a float tensor
    assert size.quantized_bytes == qm.storage_bytes()
    assert size.total_bytes == sum(t.numel() * t.element_size() for t in qm.state_dict().values())


def test_layer_table_compares_the_effective_weight():
    lin, qm, _ = _scaled("int8")
    ref = nn.ModuleDict({"fc": lin})
    row = layer_table(nn.ModuleDict({"fc": qm}), ref)[0]
    assert row.sqnr_db == sqnr_db(lin.weight, qm.effective_weight()) > 38
    assert sqnr_db(lin.weight, qm.dequantized_weight()) < 15  # the stored weight alone is W * s


def test_bad_input_scales():
    lin = nn.Linear(16, 8)
    q = quantize(lin.weight.detach(), QuantSpec.parse("int8"))
    with pytest.raises(InputError, match=r"shape \(16,\)"):
        to_quantized(lin, q, input_scale=torch.ones(8))
    with pytest.raises(InputError, match="finite and positive"):
        to_quantized(lin, q, input_scale=torch.zeros(16))
    with pytest.raises(InputError, match="finite and positive"):
        to_quantized(lin, q, input_scale=torch.full((16,), float("nan")))
    conv = nn.Conv2d(3, 4, 3)
    with pytest.raises(InputError, match=r"shape \(3,\) \(one per input feature\)"):  # one per input channel
        to_quantized(conv, quantize(conv.weight.detach(), QuantSpec.parse("int8")), input_scale=torch.ones(27))
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(InputError, match="convolutions with groups=1 only, not to a Conv2d with groups=2"):
        to_quantized(grouped, quantize(grouped.weight.detach(), QuantSpec.parse("int8")), input_scale=torch.ones(4))
    emb = nn.Embedding(10, 8)
    with pytest.raises(InputError, match="linear layers and convolutions"):
        to_quantized(emb, quantize(emb.weight.detach(), QuantSpec.parse("int8")), input_scale=torch.ones(8))
    with pytest.raises(InputError, match="no input scale"):
        to_quantized(lin, q).set_input_scale(torch.ones(16))

"""Per-layer table: SQNR by hand, real bits per weight, partial groups, activation format, text layout."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import InputError
from lowbit.evaluation.layers import LayerRow, format_table, layer_table, sqnr_db
from lowbit.nn.convert import float_weight


class Conv1D(nn.Module):
    """transformers' GPT-2 linear: weight stored (in, out), y = x @ W + b (recognised by name and ``nf``)."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


def _pair(plan):
    """(float reference, quantized copy) of a small model with a Linear 96->48, a Conv1D 80->32, a Conv2d."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        ref = nn.ModuleDict({"fc": nn.Linear(96, 48), "c1d": Conv1D(32, 80), "conv": nn.Conv2d(16, 8, 3)}).eval()
    q = copy.deepcopy(ref)
    lowbit.quantize(q, plan, progress=False)
    return ref, q


def test_sqnr_exact_is_inf():
    x = torch.randn(10, 10)
    assert sqnr_db(x, x.clone()) == math.inf


def test_sqnr_known_noise():
    ref = torch.full((1000,), 2.0, dtype=torch.float64)
    approx = ref + torch.tensor([0.02, -0.02], dtype=torch.float64).repeat(500)  # noise power: 1e-4 of the signal
    assert sqnr_db(ref, approx) == pytest.approx(40.0, abs=1e-9)
    assert sqnr_db(ref.half(), approx.float()) == pytest.approx(40.0, abs=1e-4)  # any dtypes
    assert sqnr_db(torch.zeros(3), torch.ones(3)) == -math.inf


def test_sqnr_shape_mismatch():
    with pytest.raises(InputError, match=r"\(3,\) and \(4,\)"):
        sqnr_db(torch.zeros(3), torch.zeros(4))


def test_rows_against_the_float_reference():
    ref, q = _pair(lowbit.QuantPlan.uniform("int4-g64-asym", skip=()))
    rows = {r.name: r for r in layer_table(q, ref)}
    assert list(rows) == ["fc", "c1d", "conv"]
    fc = rows["fc"]
    assert (fc.module_type, fc.weight_shape, fc.format) == ("QuantLinear", (48, 96), "int4-g64-asym")
    assert fc.bits_per_weight == q["fc"].bits_per_weight() == 8 * (48 * 96 // 2 + 48 * 2 * 3) / (48 * 96)
    assert fc.sqnr_db == sqnr_db(ref["fc"].weight, q["fc"].dequantized_weight())
    assert 15 < fc.sqnr_db < 30
    assert fc.notes == "last group 32 of 64"  # 96 = 64 + 32
    c1d = rows["c1d"]  # Conv1D stores (in, out): compared in lowbit's (out, in) layout
    assert (c1d.weight_shape, c1d.notes) == ((32, 80), "last group 16 of 64")
    assert c1d.sqnr_db == sqnr_db(float_weight(ref["c1d"]), q["c1d"].dequantized_weight()) > 15
    assert rows["conv"].weight_shape == (8, 16, 3, 3) and rows["conv"].notes == "last group 16 of 64"  # 144


def test_without_reference_sqnr_is_none():
    _, q = _pair(lowbit.QuantPlan.uniform("int8", skip=()))
    rows = layer_table(q)
    assert [r.sqnr_db for r in rows] == [None, None, None] and all(r.notes == "" for r in rows)


def test_activation_format_is_shown():
    _, q = _pair(lowbit.QuantPlan.uniform("int8", act="int8-token", skip=("conv",)))
    assert [r.format for r in layer_table(q)] == ["int8+act:int8-token:dynamic"] * 2


def test_bad_references():
    ref, q = _pair(lowbit.QuantPlan.uniform("int8", skip=()))
    with pytest.raises(InputError, match=r"quantized too; pass the float model"):
        layer_table(q, q)
    with pytest.raises(InputError, match=r"no module 'fc'"):
        layer_table(q, nn.Sequential())
    ref["fc"] = nn.Linear(96, 47)
    with pytest.raises(InputError, match=r"'fc'.*\(47, 96\).*\(48, 96\)"):
        layer_table(q, ref)


def test_format_table_aligns_columns():
    rows = [
        LayerRow("model.layers.0.mlp.down_proj", "QuantLinear", (64, 192), "int4-g128-asym", 4.1875, 23.456,
                 "last group 64 of 128"),
        LayerRow("lm_head", "QuantLinear", (256, 64), "int8", 8.25, math.inf, ""),
        LayerRow("emb", "QuantEmbedding", (256, 64), "nf4", 4.25, None, ""),
    ]
    lines = format_table(rows).splitlines()
    assert lines[0].split() == ["layer", "type", "weight", "format", "bits/w", "SQNR", "dB", "notes"]
    assert set(lines[1]) == {"-", " "}
    assert lines[2].split() == ["model.layers.0.mlp.down_proj", "QuantLinear", "64x192", "int4-g128-asym",
                                "4.188", "23.5", "last", "group", "64", "of", "128"]
    assert lines[3].split()[-2:] == ["8.250", "inf"] and lines[4].split()[-1] == "-"
    col = lines[0].index("bits/w") + len("bits/w")  # numbers are right-aligned under their header
    assert all(line[:col].endswith(v) for line, v in zip(lines[2:], ["4.188", "8.250", "4.250"]))
    assert format_table([]).splitlines()[0].startswith("layer")

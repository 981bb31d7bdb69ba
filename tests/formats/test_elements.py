"""Element formats: the level tables (NF4, FP4 E2M1, ternary), FP8 encoding and saturation."""

from __future__ import annotations

import pytest
import torch

from lowbit.formats import decode_elements, element_max, encode_elements, nf4_levels, quantize
from lowbit.spec import QuantSpec

# QLoRA (Dettmers et al. 2023), Appendix E / bitsandbytes' NF4 table
NF4_PUBLISHED = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def _codes(n: int) -> torch.Tensor:
    return torch.arange(n, dtype=torch.int64).to(torch.uint8)


def test_nf4_levels_match_the_published_table():
    levels = nf4_levels()
    assert len(levels) == 16
    assert max(abs(a - b) for a, b in zip(levels, NF4_PUBLISHED)) < 1e-6
    assert torch.equal(decode_elements(_codes(16), "nf4"), torch.tensor(levels, dtype=torch.float32))
    assert levels[7] == 0.0 and levels[0] == -1.0 and levels[-1] == 1.0


def test_fp4_e2m1_levels_follow_the_ocp_bit_layout():
    # code = sign bit (8) | 3-bit magnitude: 0, 0.5 (subnormal), 1, 1.5, 2, 3, 4, 6
    mags = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]
    assert decode_elements(_codes(16), "fp4_e2m1").tolist() == mags + [-m for m in mags]
    assert element_max("fp4_e2m1", 4) == 6.0


def test_ternary_levels():
    assert decode_elements(_codes(3), "ternary").tolist() == [-1.0, 0.0, 1.0]
    assert element_max("ternary", 2) == 1.0


@pytest.mark.parametrize("bits", range(2, 9))
def test_int_element_max(bits):
    assert element_max("int", bits) == 2 ** (bits - 1) - 1


@pytest.mark.parametrize("fmt, n", [("fp4_e2m1", 16), ("nf4", 16), ("ternary", 3)])
def test_table_levels_encode_to_themselves(fmt, n):
    levels = decode_elements(_codes(n), fmt)
    back = decode_elements(encode_elements(levels, fmt), fmt)
    assert torch.equal(back, levels)  # -0.0 == 0.0 for fp4's second zero


@pytest.mark.parametrize("fmt", ["fp4_e2m1", "nf4", "ternary", "fp8_e4m3", "fp8_e5m2"])
def test_encode_is_nearest_level(fmt, gen):
    n = 256 if fmt.startswith("fp8") else (3 if fmt == "ternary" else 16)
    levels = decode_elements(_codes(n), fmt)
    levels = levels[torch.isfinite(levels)]
    emax = element_max(fmt, 8)
    x = (torch.rand(4000, generator=gen) * 2 - 1) * emax * 1.05  # includes values past the largest level
    got = decode_elements(encode_elements(x, fmt), fmt)
    best = (x[:, None] - levels[None, :]).abs().min(dim=1).values
    assert torch.allclose((x - got).abs(), best, rtol=0, atol=1e-6 * emax)


def test_ties_go_toward_minus_infinity():
    # documented in elements.py: a value exactly halfway between two levels takes the lower one
    got = decode_elements(encode_elements(torch.tensor([0.25, -0.25, 0.75, 5.0, -5.0]), "fp4_e2m1"), "fp4_e2m1")
    assert got.tolist() == [0.0, -0.5, 0.5, 4.0, -6.0]
    got = decode_elements(encode_elements(torch.tensor([0.5, -0.5]), "ternary"), "ternary")
    assert got.tolist() == [0.0, -1.0]


def test_fp8_maxima():
    assert element_max("fp8_e4m3", 8) == 448.0
    assert element_max("fp8_e5m2", 8) == 57344.0


@pytest.mark.parametrize("fmt, top", [("fp8_e4m3", 448.0), ("fp8_e5m2", 57344.0)])
def test_fp8_saturates_instead_of_overflowing(fmt, top):
    x = torch.tensor([1e6, -1e6, top * 1.2, -top * 1.2, 3e38])
    got = decode_elements(encode_elements(x, fmt), fmt)
    assert got.tolist() == [top, -top, top, -top, top]
    assert torch.isfinite(got).all()


@pytest.mark.parametrize("fmt, dtype", [("fp8_e4m3", torch.float8_e4m3fn), ("fp8_e5m2", torch.float8_e5m2)])
def test_fp8_codes_are_torch_float8_bit_patterns(fmt, dtype):
    all_vals = _codes(256).view(dtype).float()
    finite = all_vals[torch.isfinite(all_vals)]
    codes = encode_elements(finite, fmt)
    assert torch.equal(codes.view(dtype).float(), finite)
    assert torch.equal(decode_elements(codes, fmt), finite)


def test_fp8_e4m3_saturation_through_quantize():
    # per-channel range 1 -> scale 1/448; an element of 1e6 lands on the largest level, 448 * scale
    spec = QuantSpec.parse("fp8-e4m3")
    x = torch.tensor([[0.5, 1e6, -1e6], [0.25, 0.5, 1.0]])
    lo, hi = -torch.ones(2, 1), torch.ones(2, 1)
    q = quantize(x, spec, lo, hi)
    y = q.dequantize()
    assert y[0, 1] == 448 * q.scale[0, 0] and y[0, 2] == -448 * q.scale[0, 0]
    assert torch.allclose(y[0, 1], torch.tensor(1.0))
    assert torch.equal(y[1], x[1])  # powers of two survive exactly


def test_fp8_e5m2_saturation_through_quantize():
    spec = QuantSpec.parse("fp8-e5m2")
    x = torch.tensor([[1e6, 2.0]])
    q = quantize(x, spec, -torch.full((1, 1), 2.0), torch.full((1, 1), 2.0))
    assert q.dequantize()[0, 0] == 57344.0 * q.scale[0, 0]

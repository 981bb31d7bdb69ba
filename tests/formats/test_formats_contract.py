"""The shared contract every spec obeys, parametrized over every preset plus extra specs and shapes.

Contract of ``quantize`` / ``dequantize`` (``lowbit.formats.qtensor``):
codes are uint8 in range; the scale grid has ``grid_shape``; every scale is exactly what its storage format
holds; dequantize keeps the shape and returns the requested dtype; each element lands on the nearest value
its tile can represent; quantizing the dequantized tensor with the same range reproduces the codes;
results are deterministic; zeros stay zero; values outside ``[lo, hi]`` clip; bad input raises InputError.
Then quality: per-preset SQNR floors on N(0, 1), more bits and finer tiles never worse.
"""

from __future__ import annotations

import functools

import pytest
import torch

from lowbit.errors import InputError
from lowbit.formats import (
    as_matrix_shape,
    decode_elements,
    decode_scale,
    default_range,
    dequantize,
    element_max,
    encode_scale,
    fake_quantize,
    grid_shape,
    quantize,
    to_blocks,
)
from lowbit.formats.blocks import block_amax, expand
from lowbit.formats.elements import codebook
from lowbit.spec import PRESETS, QuantSpec

EXTRA = [
    "int8-token",
    "int8-asym",
    "int5-g48-asym",
    "int4-g100-asym",  # 100 divides none of the test rows
    "int4-g32",
    "int4-b4x8",
    "int3-b3x5-asym",
    "int8-se8m0",
    "int4-g32-se8m0",
    "int4-g32-asym-sbf16",
    "int8-asym-sfp32",
    "int4-g16-sfp8",  # NVFP4-style two-level scales on integers
    "int4-g16-asym-sfp8",
    "int4-g32-asym-se8m0",
    "fp4-e2m1",
    "fp8-e4m3-tensor",
    "fp8-e5m2-g32-se8m0",
    "nf4-g100",
    "nf4-ch-sbf16",
    "ternary-g64",
]
SCHEMES = list(PRESETS) + EXTRA
SHAPES = [(257,), (17, 300), (6, 3, 5, 7)]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@functools.lru_cache(maxsize=None)
def _case(scheme: str, shape: tuple[int, ...]):
    """``(spec, x, q, y)`` for one contract case, computed once per session (tests only read them)."""
    spec = QuantSpec.parse(scheme)
    x = _sample(shape)
    q = quantize(x, spec)
    return spec, x, q, q.dequantize()


def _sample(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """N(0, 1) with an all-zero row (an all-zero tile under per-channel scales) and a few exact zeros."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    x.view(-1)[::11] = 0.0
    if len(shape) > 1:
        x[1] = 0.0
    return x


def _full_scale(q) -> torch.Tensor:
    """Effective per-tile scale ``(gr, gc)`` (block scale times the global scale, if any)."""
    return q.scale if q.global_scale is None else q.scale * q.global_scale


def _levels(q) -> torch.Tensor:
    """Every value each tile can represent: ``(gr, gc, n_levels)``."""
    spec = q.spec
    if spec.format == "int":
        codes = torch.arange(2**spec.bits, dtype=torch.float32)
        zp = q.zero_point.float() if q.zero_point is not None else torch.full_like(q.scale, 2.0 ** (spec.bits - 1))
        elems = codes[None, None, :] - zp[..., None]
    else:
        n = 256 if spec.format.startswith("fp8") else codebook(spec.format).levels.numel()
        vals = decode_elements(torch.arange(n).to(torch.uint8), spec.format)
        elems = vals[torch.isfinite(vals)][None, None, :].expand(*q.scale.shape, -1)
    return elems * _full_scale(q)[..., None]


cases = pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
schemes = pytest.mark.parametrize("scheme", SCHEMES)


# ---- structure ---------------------------------------------------------------------------------------


@schemes
@cases
def test_codes_and_scale_grid(scheme, shape):
    spec, x, q, _ = _case(scheme, shape)
    grid = grid_shape(spec, shape)
    assert q.codes.dtype == torch.uint8 and q.codes.shape == x.shape
    assert int(q.codes.max()) < 2**spec.bits
    assert q.scale.dtype == torch.float32 and tuple(q.scale.shape) == grid
    assert torch.isfinite(q.scale).all() and (q.scale >= 0).all()
    # only an all-zero tile may get a zero scale (NVFP4's FP8 scales have no smallest-normal clamp)
    assert ((q.scale > 0) | (block_amax(x, spec) == 0)).all()
    if spec.has_zero_point:
        assert q.zero_point.dtype == torch.uint8 and tuple(q.zero_point.shape) == grid
        assert int(q.zero_point.max()) < 2**spec.bits
    else:
        assert q.zero_point is None
    if spec.has_global_scale:
        assert q.global_scale.dtype == torch.float32 and q.global_scale.dim() == 0 and q.global_scale > 0
    else:
        assert q.global_scale is None
    if spec.format.startswith("fp8"):  # no NaN/Inf bit patterns are ever produced
        assert torch.isfinite(decode_elements(q.codes, spec.format)).all()


@schemes
@cases
def test_scales_are_exact_in_their_storage_format(scheme, shape):
    spec, _, q, _ = _case(scheme, shape)
    stored = encode_scale(q.scale, spec.scale_format)
    assert torch.equal(decode_scale(stored, spec.scale_format), q.scale), "encode/decode is not bit-exact"
    if spec.scale_format == "e8m0":
        assert stored.dtype == torch.uint8
        mant, _ = torch.frexp(q.scale)
        assert (mant == 0.5).all(), "e8m0 scales are powers of two"
    if spec.scale_format == "fp8_e4m3":
        assert stored.dtype == torch.uint8 and (q.scale <= 448).all()
        assert torch.equal(q.scale.to(torch.float8_e4m3fn).float(), q.scale)
    if spec.scale_format in ("fp16", "bf16"):
        dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[spec.scale_format]
        assert stored.dtype == dt and torch.equal(q.scale.to(dt).float(), q.scale)


@schemes
def test_dequantize_keeps_shape_and_gives_the_dtype(scheme):
    shape = (6, 3, 5, 7)
    spec, x, q, ref = _case(scheme, shape)
    assert ref.shape == x.shape and ref.dtype == torch.float32
    for dtype in DTYPES[1:]:
        y = dequantize(q, dtype)
        assert y.shape == x.shape and y.dtype == dtype
        assert torch.equal(y, ref.to(dtype))
    # fake_quantize computes in (and returns) the input's dtype
    xb = x.to(torch.bfloat16)
    fq = fake_quantize(xb, spec)
    assert fq.dtype == torch.bfloat16 and fq.shape == x.shape
    assert torch.equal(fq, quantize(xb, spec).dequantize(torch.bfloat16))


# ---- values ------------------------------------------------------------------------------------------


@schemes
@cases
def test_every_element_lands_on_the_nearest_level_of_its_tile(scheme, shape):
    spec, x, q, y = _case(scheme, shape)
    xb, yb = to_blocks(x, spec), to_blocks(y, spec)  # (gr, br, gc, bc)
    levels = _levels(q)[:, None, :, None, :]  # (gr, 1, gc, 1, L)
    tol = 1e-5 * expand(_full_scale(q)) + 1e-6 * xb.abs()
    # the value is one of its tile's levels ...
    assert ((yb[..., None] - levels).abs().amin(-1) <= tol).all()
    # ... and no level of the tile is closer to the input
    nearest = (xb[..., None] - levels).abs().amin(-1)
    assert ((xb - yb).abs() <= nearest + tol).all()


@pytest.mark.parametrize("scheme", [s for s in SCHEMES if QuantSpec.parse(s).format == "int"])
@cases
def test_int_error_at_most_half_a_step(scheme, shape):
    """Integer grids with the tile's min/max range: every element within scale/2 of its value.

    Float scales are rounded up, so the grid always covers the range. With e8m0 scales the MX rule
    (scale = 2^(floor(log2 amax) - emax_elem)) may put the range's top above the largest code: up to one
    whole step there, plus the zero point's half step for asymmetric grids. FP8 E4M3 scales are rounded to
    nearest (as NVFP4 does), so the grid may fall short of the range by up to 2^-4 of its width.
    """
    spec, x, q, y = _case(scheme, shape)
    err = to_blocks((x - y).abs(), spec)
    step = expand(_full_scale(q))
    qmax = 2**spec.bits - 1 if spec.has_zero_point else 2 ** (spec.bits - 1) - 1
    bound = {"e8m0": 1.5 if spec.has_zero_point else 1.0, "fp8_e4m3": 0.5 + qmax * 2**-4}.get(spec.scale_format, 0.5)
    assert (err <= step * bound * (1 + 1e-5) + 1e-7).all(), float((err / step).max())


def test_scales_round_up_so_the_range_is_covered():
    # the largest |x| of each row must sit inside the integer grid (a scale rounded down would clip it)
    for scheme in ["int8", "int8-sbf16", "int8-asym", "int8-asym-sbf16", "int4-g32-asym-sbf16"]:
        spec = QuantSpec.parse(scheme)
        x = _sample((64, 128), seed=3)
        q = quantize(x, spec)
        lo, hi = default_range(x, spec)
        if spec.has_zero_point:
            span = (2**spec.bits - 1) * q.scale
            assert (span >= (hi.clamp(min=0) - lo.clamp(max=0))).all(), scheme
        else:
            assert (q.scale * element_max("int", spec.bits) >= torch.maximum(lo.abs(), hi.abs())).all(), scheme


@schemes
@cases
def test_quantize_is_idempotent(scheme, shape):
    """Quantizing the dequantized tensor again, with the same per-tile range, gives the same codes.

    With each tile's own range it cannot hold for every format: the dequantized tile's min/max moves for
    asymmetric integers (the zero point is rounded), its mean magnitude moves for ternary (absmean), and
    the extra negative code of symmetric integers can double an e8m0 scale. The values stay fixed points
    of the same-range map in every case, which is what a second pass through a quantized model sees.
    """
    spec, x, q, y = _case(scheme, shape)
    lo, hi = default_range(x, spec)
    q2 = quantize(y, spec, lo, hi)
    assert torch.equal(q2.codes, q.codes) and torch.equal(q2.scale, q.scale)
    assert torch.equal(q2.dequantize(), y)
    own_range_fixed = spec.format != "ternary" and not spec.has_zero_point and not (
        spec.format == "int" and spec.scale_format == "e8m0")
    if own_range_fixed:
        assert torch.equal(fake_quantize(y, spec), y)


@schemes
def test_deterministic(scheme):
    spec, x, q, y = _case(scheme, (17, 300))
    again = quantize(x.clone(), spec)
    assert torch.equal(again.codes, q.codes) and torch.equal(again.scale, q.scale)
    assert torch.equal(again.dequantize(), y)


@schemes
@pytest.mark.parametrize("k", [-6, 5])
def test_power_of_two_scaling_commutes(scheme, k):
    """``fq(x * 2^k) == fq(x) * 2^k``: scales absorb any power of two (small ones included, e.g. weights
    around 1e-2, whatever the scale storage)."""
    spec, x, _, y = _case(scheme, (17, 300))
    assert torch.equal(fake_quantize(x * 2.0**k, spec), y * 2.0**k)


@schemes
@cases
def test_zeros(scheme, shape):
    spec, x, _, y = _case(scheme, shape)
    zeros = torch.zeros(shape)
    assert torch.equal(quantize(zeros, spec).dequantize(), zeros)
    # a zero element stays exactly zero (symmetric grids hold 0; affine zero points are integers)
    assert (y[x == 0] == 0).all()
    if len(shape) > 1:
        assert (y[1] == 0).all()  # the all-zero row


@schemes
def test_lo_hi_clip(scheme):
    """Values outside ``[lo, hi]`` clip: the grid's end levels sit at the range's ends and nothing passes them.

    The end levels are exactly at the ends for scale-only formats; within half a step (plus the slack of
    a rounded-up scale) for affine integers, whose zero point is rounded; one extra step below ``lo`` for
    symmetric integers (code -2^(b-1)); and for e8m0 scales wherever the MX power-of-two rule puts them
    (between 0.5 and 2 times the range's end).
    """
    spec = QuantSpec.parse(scheme)
    shape = (8, 96)
    grid = grid_shape(spec, shape)
    lo, hi = torch.full(grid, -1.0), torch.full(grid, 1.0)
    x = _sample(shape) * 10  # most values far outside [-1, 1]
    q = quantize(x, spec, lo, hi)
    levels = _levels(q)
    t, b = levels.amax(-1), levels.amin(-1)  # (gr, gc)
    top, bottom = expand(t), expand(b)
    yb, xb = to_blocks(q.dequantize(), spec), to_blocks(x, spec)
    assert ((yb <= top) & (yb >= bottom)).all()
    assert (yb[(xb > top).expand_as(yb)] == top.expand_as(yb)[xb > top]).all()
    assert (yb[(xb < bottom).expand_as(yb)] == bottom.expand_as(yb)[xb < bottom]).all()
    assert (xb.abs() > 2).sum() > xb.numel() // 2, "the test needs values far outside the range"
    step = _full_scale(q)
    if spec.scale_format == "e8m0":  # a power of two at most 2x coarser than needed, reaching both ends
        assert ((t >= 1 - 1.5 * step) & (b <= -1 + 1.5 * step)).all()
        assert (t - b <= 2 * 2 + step).all()
    elif spec.has_zero_point:
        assert (t >= 1 - step / 2 - 1e-6).all() and (b <= -1 + step / 2 + 1e-6).all()
        assert (t <= 1 + step).all() and (b >= -1 - step).all()
    else:
        assert ((t - 1).abs() <= 2e-3).all()
        extra = step if spec.format == "int" else torch.zeros_like(step)
        assert ((b + 1 + extra).abs() <= 2e-3).all()


# ---- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int8", "int4-g32-asym", "nvfp4", "mxfp4", "nf4", "ternary"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_raises(scheme, bad):
    x = _sample((4, 64))
    x[2, 5] = bad
    with pytest.raises(InputError, match=r"\(4, 64\) holds 1 NaN/Inf"):
        quantize(x, QuantSpec.parse(scheme))


@pytest.mark.parametrize("shape", [(0,), (0, 16), (4, 0)])
def test_empty_input_raises(shape):
    with pytest.raises(InputError, match="empty"):
        quantize(torch.zeros(shape), QuantSpec.parse("int8"))


def test_wrong_range_shape_raises():
    spec = QuantSpec.parse("int4-g32")
    x = _sample((8, 96))  # grid (8, 3)
    with pytest.raises(InputError, match=r"\(8, 1\).*\(8, 3\).*int4-g32"):
        quantize(x, spec, -torch.ones(8, 1), torch.ones(8, 1))
    with pytest.raises(InputError):
        quantize(x, spec, -torch.ones(8, 3), torch.ones(3, 8))
    with pytest.raises(InputError, match="both"):
        quantize(x, spec, lo=-torch.ones(8, 3))


# ---- scale rules of the MX and NVFP4 formats -----------------------------------------------------------


@pytest.mark.parametrize("scheme, emax_elem", [("mxfp4", 2), ("mxfp8", 8), ("mxfp8-e5m2", 15)])
def test_mx_shared_exponent_rule(scheme, emax_elem):
    """OCP MX v1.0 section 6.3: X = 2^(floor(log2(amax)) - emax_elem), emax_elem = 2 (FP4), 8 (E4M3), 15 (E5M2)."""
    spec = QuantSpec.parse(scheme)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g) * torch.exp2(torch.randint(-20, 20, (64, 1), generator=g).float())
    # tiles whose amax sits exactly on, and a few ulps below, a power of two (where an fp32 log2 rounds up)
    p = torch.exp2(torch.arange(-10, 10).float())
    below = torch.nextafter(p, torch.zeros(()))
    x[:20, 0], x[20:40, 0] = p, -below
    x[40:60, 0] = torch.nextafter(below, torch.zeros(()))
    x[:60, 1:32] = x[:60, 1:32].clamp(-0.5, 0.5) * p.min()  # keep column 0 the largest in its group
    amax = block_amax(x, spec).double()
    q = quantize(x, spec)
    expected = torch.exp2(torch.floor(torch.log2(amax)) - emax_elem).float()
    assert torch.equal(q.scale, expected)
    assert torch.equal(encode_scale(q.scale, "e8m0").long(), torch.log2(expected).long() + 127)


def test_nvfp4_scales():
    spec = QuantSpec.parse("nvfp4")
    x = _sample((16, 256)) * 3
    q = quantize(x, spec)
    # block scales are FP8 E4M3 values, the global scale one fp32 number: amax(tensor) / (6 * 448)
    assert torch.equal(q.scale.to(torch.float8_e4m3fn).float(), q.scale)
    assert q.global_scale.dtype == torch.float32 and q.global_scale.shape == ()
    assert torch.allclose(q.global_scale, x.abs().max() / (6 * 448), rtol=1e-6)
    assert q.scale.max() == 448  # the largest block uses the top of the FP8 range
    # effective block scale amax / 6 to within FP8 E4M3 rounding (3 mantissa bits)
    raw = block_amax(x, spec) / 6
    nonzero = raw > 0
    rel = ((q.scale * q.global_scale - raw).abs() / raw)[nonzero]
    assert rel.max() <= 2**-4 + 1e-6


# ---- quality -----------------------------------------------------------------------------------------

# measured on N(0, 1) 256x512 (seed 0): int8 42.5, int8-tensor 39.7, int6 30.3, int4-ch 17.4,
# int4-g128/64/32-asym 19.9/20.8/21.8, int3-g64-asym 14.2, int2-g64-asym 6.8, ternary 5.8, fp8-e4m3 31.6,
# fp8-e5m2 25.6, mxfp8 30.7, mxfp4 18.8, nvfp4 20.4, nf4 20.7 dB; floors sit about 1 dB below.
SQNR_FLOORS = {
    "int8": 41.5, "int8-tensor": 38.5, "int6": 29.3, "int4-ch": 16.5, "int4-g128-asym": 19.0,
    "int4-g64-asym": 19.8, "int4-g32-asym": 20.8, "int3-g64-asym": 13.2, "int2-g64-asym": 6.0,
    "ternary": 5.0, "fp8-e4m3": 30.5, "fp8-e5m2": 24.6, "mxfp8": 29.7, "mxfp4": 17.8, "nvfp4": 19.4, "nf4": 19.7,
}


@pytest.fixture(scope="module")
def gauss() -> torch.Tensor:
    return torch.randn(256, 512, generator=torch.Generator().manual_seed(0))


def test_every_preset_has_a_floor():
    assert set(SQNR_FLOORS) == set(PRESETS)


@pytest.mark.parametrize("scheme", list(PRESETS))
def test_sqnr_floor(scheme, gauss, sqnr):
    got = sqnr(gauss, fake_quantize(gauss, QuantSpec.parse(scheme)))
    assert got > SQNR_FLOORS[scheme], f"{scheme}: {got:.2f} dB"


@pytest.mark.parametrize("tail", ["", "-g64-asym", "-tensor", "-g32-sbf16"])
def test_more_bits_never_worse(tail, gauss, sqnr):
    db = [sqnr(gauss, fake_quantize(gauss, QuantSpec.parse(f"int{b}{tail}"))) for b in range(2, 9)]
    assert all(b > a + 3 for a, b in zip(db, db[1:])), db  # ~6 dB per bit; at least 3


@pytest.mark.parametrize("base, grans", [
    ("int4", ["-tensor", "-ch", "-g256", "-g128", "-g64", "-g32", "-g16"]),
    ("int4", ["-tensor-asym", "-ch-asym", "-g128-asym", "-g32-asym", "-g8-asym"]),
    ("nf4", ["-tensor", "-ch", "-g128", "-g64", "-g16"]),
    ("fp4-e2m1", ["-tensor", "-ch", "-g64", "-g16"]),
    ("int8", ["-tensor", "-b16x16", "-b4x4"]),
])
def test_finer_granularity_never_worse(base, grans, gauss, sqnr):
    db = [sqnr(gauss, fake_quantize(gauss, QuantSpec.parse(base + g))) for g in grans]
    assert all(b >= a for a, b in zip(db, db[1:])), dict(zip(grans, db))


def test_asymmetric_helps_one_sided_data(sqnr):
    x = torch.rand(64, 256, generator=torch.Generator().manual_seed(2))  # all positive
    sym = sqnr(x, fake_quantize(x, QuantSpec.parse("int4-g64")))
    asym = sqnr(x, fake_quantize(x, QuantSpec.parse("int4-g64-asym")))
    assert asym > sym + 4


def test_matrix_view_of_higher_rank_tensors():
    # a (out, in, kh, kw) weight is quantized as (out, in*kh*kw): per channel = per output filter
    x = _sample((6, 3, 5, 7))
    spec = QuantSpec.parse("int8")
    q4 = quantize(x, spec)
    q2 = quantize(x.reshape(as_matrix_shape(x.shape)), spec)
    assert torch.equal(q4.codes.reshape(6, -1), q2.codes) and torch.equal(q4.scale, q2.scale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_finds_every_nan_and_inf(dtype):
    from lowbit.formats import all_finite

    x = torch.randn(37, 53).to(dtype)
    assert all_finite(x) and all_finite(x[:, ::2]) and all_finite(torch.empty(0, 3, dtype=dtype))
    for bad in (float("nan"), float("inf"), -float("inf")):
        for where in ((0, 0), (36, 52), (17, 4)):
            y = x.clone()
            y[where] = bad
            assert not all_finite(y), (bad, where)
    assert all_finite(torch.arange(5)) and all_finite(torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(InputError, match="1 NaN/Inf"):
        quantize(torch.tensor([[1.0, float("nan")]]), QuantSpec.parse("int8"))

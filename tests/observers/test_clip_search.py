"""mse_clip_search: never worse than no clipping, better on heavy tails, per tile, importance-aware, fast."""

from __future__ import annotations

import time

import pytest
import torch

from lowbit.observers.clip_search import mse_clip_search
from lowbit.errors import InputError
from lowbit.formats import default_range, fake_quantize, grid_shape
from lowbit.formats.blocks import block_sum
from lowbit.spec import QuantSpec


def _laplace(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def _tile_err(w, spec, lo=None, hi=None, importance=None):
    e = (fake_quantize(w, spec, lo, hi) - w).double().pow(2)
    if importance is not None:
        e = e * importance.double()
    return block_sum(e, spec)  # (gr, gc)


@pytest.mark.parametrize(
    "spec_name",
    ["int8", "int4-g64-asym", "int3-g32", "int2-g64-asym", "int4-b8x8", "fp8-e4m3", "nf4", "mxfp4", "nvfp4",
     "int4-g48-asym"],
)
def test_never_worse_than_no_clipping_in_any_tile(spec_name, gen):
    spec = QuantSpec.parse(spec_name)
    w = _laplace((40, 192), gen)
    lo, hi = mse_clip_search(w, spec)
    assert lo.shape == hi.shape == grid_shape(spec, w.shape) and lo.dtype == torch.float32
    base = _tile_err(w, spec)
    if spec.scale_format == "fp8_e4m3":  # NVFP4's per-tensor scale couples the tiles: compare the total
        assert float(_tile_err(w, spec, lo, hi).sum()) <= float(base.sum())
    else:
        assert bool((_tile_err(w, spec, lo, hi) <= base).all())


@pytest.mark.parametrize("spec_name, gain_db", [("int4-g64-asym", 0.2), ("int3-g64-asym", 0.5), ("int4-ch", 1.0)])
def test_strictly_better_on_heavy_tails(spec_name, gain_db, gen, sqnr):
    spec = QuantSpec.parse(spec_name)
    w = _laplace((128, 256), gen)
    lo, hi = mse_clip_search(w, spec)
    assert sqnr(w, fake_quantize(w, spec, lo, hi)) > sqnr(w, fake_quantize(w, spec)) + gain_db


def test_tiles_are_searched_independently(gen):
    spec = QuantSpec.parse("int3-ch")
    a, b = _laplace((8, 64), gen), torch.rand(8, 64, generator=gen)
    lo, hi = mse_clip_search(torch.cat([a, b]), spec)
    lo_a, hi_a = mse_clip_search(a, spec)
    lo_b, hi_b = mse_clip_search(b, spec)
    assert torch.equal(lo, torch.cat([lo_a, lo_b])) and torch.equal(hi, torch.cat([hi_a, hi_b]))


def test_candidates_are_the_documented_ratios(gen):
    spec = QuantSpec.parse("int2-ch-asym")
    w = _laplace((16, 64), gen)
    lo0, hi0 = default_range(w, spec)
    lo, hi = mse_clip_search(w, spec, grid=10, max_shrink=0.5)
    ratio = hi / hi0  # (16, 1)
    k = (1 - ratio) * 10 / 0.5
    assert torch.allclose(k, k.round(), atol=1e-4) and bool(((k.round() >= 0) & (k.round() <= 9)).all())
    assert torch.allclose(lo, lo0 * ratio)
    assert bool((k.round() > 0).any())  # 2 bits on Laplace rows: some rows do clip
    one_lo, one_hi = mse_clip_search(w, spec, grid=1)  # only k = 0: the unclipped range
    assert torch.equal(one_lo, lo0) and torch.equal(one_hi, hi0)


def test_given_range_is_the_starting_point(gen):
    spec = QuantSpec.parse("int4-ch-asym")
    w = _laplace((4, 64), gen)
    lo0, hi0 = torch.full((4, 1), -3.0), torch.full((4, 1), 3.0)
    lo, hi = mse_clip_search(w, spec, lo=lo0, hi=hi0, grid=8, max_shrink=0.4)
    assert bool((hi <= 3.0).all() & (hi >= 3.0 * 0.6).all())
    assert bool((_tile_err(w, spec, lo, hi) <= _tile_err(w, spec, lo0, hi0)).all())


def test_importance_protects_a_column(gen):
    spec = QuantSpec.parse("int3-ch-asym")
    w = _laplace((64, 128), gen)
    imp = torch.ones(128)
    imp[7] = 1e4
    plain = mse_clip_search(w, spec)
    weighted = mse_clip_search(w, spec, importance=imp)

    def col_err(r):
        return float((fake_quantize(w, spec, *r) - w)[:, 7].pow(2).sum())

    assert col_err(weighted) < col_err(plain)
    # and the weighted objective itself is what the search minimizes
    objective = [float(_tile_err(w, spec, *r, importance=imp).sum()) for r in (weighted, plain)]
    assert objective[0] <= objective[1]


def test_per_element_importance(gen):
    spec = QuantSpec.parse("int4-ch")
    w = _laplace((8, 32), gen)
    lo, hi = mse_clip_search(w, spec, importance=torch.ones(8, 32))
    lo1, hi1 = mse_clip_search(w, spec)
    assert torch.equal(lo, lo1) and torch.equal(hi, hi1)


def test_conv_weights_use_the_2d_view(gen):
    spec = QuantSpec.parse("int4-ch-asym")
    w = _laplace((8, 3, 3, 3), gen)
    lo, hi = mse_clip_search(w, spec, importance=torch.ones(27))
    assert lo.shape == (8, 1)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"grid": 0}, "grid"),
        ({"max_shrink": 1.0}, "max_shrink"),
        ({"importance": torch.ones(5)}, "importance has shape"),
        ({"importance": -torch.ones(64)}, "non-negative"),
        ({"lo": torch.zeros(4, 1)}, "both lo and hi"),
        ({"lo": torch.zeros(3, 1), "hi": torch.ones(3, 1)}, "scale grid"),
    ],
)
def test_bad_arguments(kwargs, match, gen):
    with pytest.raises(InputError, match=match):
        mse_clip_search(torch.randn(4, 64, generator=gen), QuantSpec.parse("int4-ch"), **kwargs)


def test_bad_tensors():
    spec = QuantSpec.parse("int4-ch")
    with pytest.raises(InputError, match="empty"):
        mse_clip_search(torch.zeros(0, 8), spec)
    with pytest.raises(InputError, match="NaN"):
        mse_clip_search(torch.tensor([[1.0, float("nan")]]), spec)


def test_fast_on_a_real_layer_size(gen):
    w = _laplace((1536, 576), gen)
    spec = QuantSpec.parse("int4-g64-asym")
    t = time.perf_counter()
    mse_clip_search(w, spec, grid=20)
    assert time.perf_counter() - t < 2.0  # ~0.2 s on one core; loose for busy CI machines


# ---- Hessian-weighted search (the output error of each tile) ------------------------------------------------


def _hessian_problem(rows, cols, gen, n=None):
    """Laplace weight (rows, cols) and H = X^T X / n of correlated inputs with uneven channel scales."""
    n = n or 4 * cols
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    X = torch.randn(n, cols, generator=gen) @ mix * torch.linspace(0.2, 3.0, cols)
    return _laplace((rows, cols), gen), X.t() @ X / n


def _tile_out_err(w, spec, H, lo=None, hi=None):
    """Brute force, one tile at a time: sum over the tile's rows r of e_r^T H_tt e_r (fp64), (gr, gc)."""
    E = (fake_quantize(w, spec, lo, hi) - w).double()
    Hd = H.double()
    rows, cols = w.shape
    br, bc = spec.block(rows, cols)
    gr, gc = grid_shape(spec, w.shape)
    out = torch.zeros(gr, gc, dtype=torch.float64)
    for i in range(gr):
        for j in range(gc):
            r, c = slice(i * br, (i + 1) * br), slice(j * bc, (j + 1) * bc)
            e = E[r, c]
            out[i, j] = ((e @ Hd[c, c]) * e).sum()
    return out


def _brute_force_search(w, spec, H, grid, max_shrink):
    """The documented search by plain loops: per tile the ratio with the smallest own output error; then each
    row of tiles whose whole output error (cross terms included) exceeds the unclipped one's is reset."""
    lo0, hi0 = default_range(w, spec)
    ratios = [1 - k * max_shrink / grid for k in range(grid)]
    errs = torch.stack([_tile_out_err(w, spec, H, lo0 * r, hi0 * r) for r in ratios])  # (grid, gr, gc)
    best = errs.argmin(0)  # first minimum: ties keep the larger range
    r = torch.tensor(ratios)[best]  # (gr, gc)
    lo, hi = lo0 * r, hi0 * r
    rows, _ = w.shape
    br, _ = spec.block(rows, w.shape[1])

    def row_errs(lo_, hi_):
        E = (fake_quantize(w, spec, lo_, hi_) - w).double()
        return [float(((E[i:i + br] @ H.double()) * E[i:i + br]).sum()) for i in range(0, rows, br)]

    for i, (new, old) in enumerate(zip(row_errs(lo, hi), row_errs(lo0, hi0))):
        if new > old and lo.shape[1] > 1:
            lo[i], hi[i] = lo0[i], hi0[i]
    return _tile_out_err(w, spec, H, lo, hi)


HESSIAN_SPECS = ["int3-g16-asym", "int3-g12-asym", "int4-ch-asym", "int4-tensor", "int3-b4x16-asym", "int4-g16",
                 "nf4-g16", "int3-b3x7"]


@pytest.mark.parametrize("spec_name", HESSIAN_SPECS)
def test_hessian_search_matches_a_brute_force_loop(spec_name, gen):
    spec = QuantSpec.parse(spec_name)
    w, H = _hessian_problem(10, 40, gen)  # 40 = 2 x 16 + 8 (a short last group), 10 rows = 2 x 4 + 2
    lo, hi = mse_clip_search(w, spec, hessian=H, grid=8, max_shrink=0.5)
    got = _tile_out_err(w, spec, H, lo, hi)
    want = _brute_force_search(w, spec, H, 8, 0.5)
    assert torch.allclose(got, want, rtol=1e-9, atol=0)


@pytest.mark.parametrize("spec_name", HESSIAN_SPECS + ["mxfp4", "fp8-e4m3", "int2-g32-asym"])
def test_hessian_search_never_worse_than_min_max(spec_name, gen):
    spec = QuantSpec.parse(spec_name)
    w, H = _hessian_problem(48, 96, gen)
    lo, hi = mse_clip_search(w, spec, hessian=H)
    # per tile: guaranteed (ratio 1 is tried)
    assert bool((_tile_out_err(w, spec, H, lo, hi) <= _tile_out_err(w, spec, H)).all())

    # and the whole output error trace((W - Q) H (W - Q)^T), cross terms between column tiles included
    def trace_err(q):
        D = (w - q).double()
        return float(((D @ H.double()) * D).sum())

    assert trace_err(fake_quantize(w, spec, lo, hi)) <= trace_err(fake_quantize(w, spec))


def test_diagonal_hessian_is_importance(gen):
    spec = QuantSpec.parse("int3-g16-asym")
    w, _ = _hessian_problem(16, 40, gen)
    imp = torch.rand(40, generator=gen) + 0.1
    by_h = mse_clip_search(w, spec, hessian=torch.diag(imp))
    by_imp = mse_clip_search(w, spec, importance=imp)
    e_h = _tile_err(w, spec, *by_h, importance=imp)
    assert torch.allclose(e_h, _tile_err(w, spec, *by_imp, importance=imp), rtol=1e-9, atol=0)


def test_hessian_beats_the_diagonal_on_correlated_inputs(gen):
    spec = QuantSpec.parse("int3-ch-asym")  # per channel: the tile error is the whole row's output error
    w, H = _hessian_problem(64, 64, gen)
    full = mse_clip_search(w, spec, hessian=H)
    diag = mse_clip_search(w, spec, importance=torch.diag(H))
    assert float(_tile_out_err(w, spec, H, *full).sum()) <= float(_tile_out_err(w, spec, H, *diag).sum())


def test_hessian_bad_arguments(gen):
    spec = QuantSpec.parse("int4-g16")
    w, H = _hessian_problem(4, 32, gen)
    with pytest.raises(InputError, match=r"hessian has shape \(16, 16\); expected \(32, 32\)"):
        mse_clip_search(w, spec, hessian=H[:16, :16])
    with pytest.raises(InputError, match="not both"):
        mse_clip_search(w, spec, hessian=H, importance=torch.ones(32))
    bad = H.clone()
    bad[0, 1] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        mse_clip_search(w, spec, hessian=bad)
    with pytest.raises(InputError, match="hessian has shape"):
        mse_clip_search(w, spec, hessian=H.numpy())


def test_hessian_search_fast_on_a_real_layer_size(gen):
    w = _laplace((1536, 576), gen)
    X = torch.randn(1024, 576, generator=gen)
    spec = QuantSpec.parse("int4-g64-asym")
    t = time.perf_counter()
    mse_clip_search(w, spec, hessian=X.t() @ X / 1024, grid=20)
    assert time.perf_counter() - t < 6.0  # ~0.6 s on one core

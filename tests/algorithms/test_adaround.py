"""AdaRound: codes on round to nearest's grid, lower output error than round to nearest, settings, and the
quantize() path (including convolutions and a saved model)."""

from __future__ import annotations

import copy
import json
import sys

import pytest
import torch
import yaml
from torch import nn

from lowbit.algorithms import AdaRound, adaround, make_algorithm
from lowbit.errors import InputError
from lowbit.formats import quantize
from lowbit.io import load, save
from lowbit.models.fmnist import skeleton
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize as quantize_model
from lowbit.spec import QuantSpec

_grid = sys.modules["lowbit.algorithms.adaround"]._grid


def _problem(rows=16, cols=48, n=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(rows, cols, generator=g)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)  # correlated inputs
    X = torch.randn(n, cols, generator=g) @ mix
    return W, X, X.T @ X / n


def _out_err(W, Wq, X):
    return float(((Wq - W) @ X.T).pow(2).sum())


@pytest.mark.parametrize("scheme", ["int4", "int3-asym", "int4-g16-asym", "int2"])
def test_codes_lie_on_the_rtn_grid_and_the_output_error_is_lower(scheme):
    spec = QuantSpec.parse(scheme)
    W, X, H = _problem()
    cfg = AdaRound(iters=400, clip_search=False)
    q = adaround(W, H, spec, cfg)
    rtn = quantize(W, spec)
    assert torch.equal(q.scale, rtn.scale)
    assert (q.zero_point is None) == (rtn.zero_point is None) and (q.zero_point is None or torch.equal(q.zero_point, rtn.zero_point))
    S, Z, qmax = _grid(rtn)
    x = W / S + Z
    codes = q.codes.float().reshape(S.shape)
    assert ((codes == torch.floor(x).clamp(0, qmax)) | (codes == (torch.floor(x) + 1).clamp(0, qmax))).all()
    assert _out_err(W, q.dequantize(), X) < 0.9 * _out_err(W, rtn.dequantize(), X)


@pytest.mark.parametrize("iters", [8, 40])
def test_no_row_ends_worse_than_round_to_nearest(iters):
    # too few iterations for the annealing to settle: rows whose learned codes lose keep their nearest codes
    spec = QuantSpec.parse("int3")
    W, X, H = _problem(rows=32, seed=2)
    q, rtn = adaround(W, H, spec, AdaRound(iters=iters, clip_search=False)), quantize(W, spec)
    row_err = lambda Wq: ((Wq - W) @ X.T).pow(2).sum(1)  # noqa: E731
    assert (row_err(q.dequantize()) <= row_err(rtn.dequantize()) * (1 + 1e-5) + 1e-6).all()


def test_it_starts_from_the_clipped_ranges_and_is_deterministic():
    spec = QuantSpec.parse("int3")
    W, X, H = _problem(seed=1)
    a, b = adaround(W, H, spec, AdaRound(iters=200)), adaround(W, H, spec, AdaRound(iters=200))
    assert torch.equal(a.codes, b.codes)
    assert not torch.equal(a.scale, quantize(W, spec).scale)  # the clipping search shrank some ranges


def test_refusals_and_settings():
    W, X, H = _problem()
    with pytest.raises(InputError, match="not an integer format"):
        adaround(W, H, QuantSpec.parse("fp4"), AdaRound(iters=1))
    with pytest.raises(InputError, match="does not fit a weight"):
        adaround(W, H[:5, :5], QuantSpec.parse("int4"), AdaRound(iters=1))
    for bad in ({"iters": 0}, {"lr": 0}, {"reg": -1}, {"warmup": 1.0}, {"beta": (2,)}, {"clip_search": "yes"}):
        with pytest.raises(InputError, match="adaround"):
            AdaRound(**bad)
    cfg = AdaRound(iters=10, beta=[10, 2])
    d = cfg.to_dict()
    assert make_algorithm(json.loads(json.dumps(d))) == cfg == make_algorithm(yaml.safe_load(yaml.safe_dump(d)))
    assert make_algorithm("adaround").needs_data


def test_a_resnet_quantizes_through_quantize_and_reloads(tmp_path):
    model = skeleton("fmnist-resnet")
    data = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    ref = model(data[:8])
    plan = QuantPlan.uniform("int4", {"name": "adaround", "iters": 50}, skip=())
    quantize_model(model, plan, data, progress=False)
    out = model(data[:8])
    assert (out - ref).abs().max() < 0.5 * ref.abs().max()
    assert torch.equal(load(save(model, tmp_path / "a", plan=plan), model=skeleton("fmnist-resnet"))(data[:8]), out)


def test_a_depthwise_convolution_learns_on_one_hessian_per_group():
    g = torch.Generator().manual_seed(3)
    conv = nn.Conv2d(6, 6, 3, padding=1, groups=6)
    with torch.no_grad():  # its own weights, not the global generator's (whose state depends on the tests before)
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) / 3)
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=g) / 3)
    # smooth images (neighbouring pixels correlate, so H is far from diagonal, where rounding to nearest would
    # already be optimal), groups of different scale (a shared Hessian would weigh them wrongly)
    x = torch.nn.functional.interpolate(torch.randn(32, 6, 4, 4, generator=g), size=8, mode="bilinear")
    x[:, :3] *= 4
    ref = conv(x).detach()

    def err(method):
        model = nn.Sequential(copy.deepcopy(conv)).eval()
        quantize_model(model, QuantPlan.uniform("int3", method, skip=()), x, progress=False)
        return float((model(x) - ref).pow(2).sum())

    assert err({"name": "adaround", "iters": 300, "clip_search": False}) < 0.9 * err("rtn")


def test_grouped_hessians_are_each_groups_patch_gram():
    from lowbit.calibration.capture import Request, collect_input_stats, conv_patches

    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2)
    x = torch.randn(5, 4, 7, 7)
    H = collect_input_stats(conv, {"": Request(conv, hessian=True)}, x, progress=False)[""].hessian
    assert H.shape == (2, 18, 18)
    P = conv_patches(conv, x, grouped=True)  # (positions, 36)
    for grp in range(2):
        Pg = P[:, grp * 18:(grp + 1) * 18]
        assert torch.allclose(H[grp], Pg.T @ Pg / 5, rtol=1e-4, atol=1e-4)

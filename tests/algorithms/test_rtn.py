"""RTN: equals quantize() without clip search, improves with it; its config round-trips and registers."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from lowbit.algorithms import ALGORITHMS, RTN, make_algorithm, rtn
from lowbit.observers.clip_search import mse_clip_search
from lowbit.errors import InputError
from lowbit.formats import quantize
from lowbit.spec import QuantSpec


def _laplace(shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(shape, generator=gen) - 0.5
    return -torch.sign(u) * torch.log1p(-2 * u.abs())


def _same(a, b) -> bool:
    def eq(x, y):
        return (x is None and y is None) or (x is not None and y is not None and torch.equal(x, y))
    return eq(a.codes, b.codes) and eq(a.scale, b.scale) and eq(a.zero_point, b.zero_point) \
        and eq(a.global_scale, b.global_scale) and a.spec == b.spec


@pytest.mark.parametrize("spec_name", ["int8", "int4-g128-asym", "nvfp4", "fp8-e4m3", "ternary", "nf4"])
def test_plain_rtn_is_quantize(spec_name, gen):
    spec = QuantSpec.parse(spec_name)
    w = torch.randn(16, 256, generator=gen)
    assert _same(rtn(w, spec), quantize(w, spec))
    assert _same(rtn(w, spec, RTN()), quantize(w, spec))


@pytest.mark.parametrize("spec_name", ["int4-g64-asym", "int3-g64-asym", "int2-g64-asym"])
def test_clip_search_raises_sqnr(spec_name, gen, sqnr):
    spec = QuantSpec.parse(spec_name)
    w = _laplace((256, 256), gen)
    plain = sqnr(w, rtn(w, spec).dequantize())
    clipped = sqnr(w, rtn(w, spec, RTN(clip_search=True)).dequantize())
    assert clipped > plain + 0.2


def test_weighted_uses_importance(gen):
    spec = QuantSpec.parse("int3-ch-asym")
    w = _laplace((64, 128), gen)
    imp = torch.ones(128)
    imp[3] = 1e4
    cfg = RTN(clip_search=True, weighted=True)
    assert cfg.needs_data and not RTN(clip_search=True).needs_data and not RTN().needs_data
    q_w = rtn(w, spec, cfg, importance=imp).dequantize()
    q_u = rtn(w, spec, RTN(clip_search=True)).dequantize()
    assert (q_w - w)[:, 3].pow(2).sum() < (q_u - w)[:, 3].pow(2).sum()
    with pytest.raises(InputError, match="needs importance"):
        rtn(w, spec, cfg)
    with pytest.raises(InputError, match="clip_search"):
        rtn(w, spec, RTN(), importance=imp)


@pytest.mark.parametrize("cfg", [RTN(), RTN(clip_search=True, grid=40, max_shrink=0.3),
                                 RTN(clip_search=True, weighted=True)])
def test_config_round_trips(cfg):
    d = cfg.to_dict()
    assert d["name"] == "rtn"
    assert RTN.from_dict(d) == cfg
    assert make_algorithm(json.loads(json.dumps(d))) == cfg
    assert make_algorithm(yaml.safe_load(yaml.safe_dump(d))) == cfg


def test_registry():
    assert set(ALGORITHMS) == {"rtn", "gptq", "awq", "adaround"} and ALGORITHMS["rtn"] is RTN
    for name, cls in ALGORITHMS.items():
        assert cls.name == name
        assert isinstance(cls().needs_data, bool)
    assert make_algorithm("rtn") == RTN()
    assert make_algorithm(" RTN ") == RTN()
    assert make_algorithm({"name": "rtn", "clip_search": True}) == RTN(clip_search=True)
    cfg = RTN(grid=7)
    assert make_algorithm(cfg) is cfg
    with pytest.raises(InputError, match=r"unknown algorithm 'gptqq'; known: rtn, gptq, awq, adaround \(chains: awq\+rtn"):
        make_algorithm("gptqq")
    with pytest.raises(InputError, match="need a 'name'"):
        make_algorithm({"clip_search": True})
    with pytest.raises(InputError, match="unknown setting"):
        make_algorithm({"name": "rtn", "clip": True})
    with pytest.raises(InputError):
        make_algorithm(3)


@pytest.mark.parametrize(
    "settings, match",
    [
        ({"grid": 0}, "grid"),
        ({"grid": 2.0}, "grid"),
        ({"max_shrink": 1.0}, "max_shrink"),
        ({"clip_search": "yes"}, "clip_search"),
        ({"weighted": True}, "clip_search: true"),
    ],
)
def test_bad_config(settings, match):
    with pytest.raises(InputError, match=match):
        RTN(**settings)


def test_config_is_frozen():
    with pytest.raises(Exception):
        RTN().grid = 3  # type: ignore[misc]


def test_weighted_uses_the_hessian(gen):
    spec = QuantSpec.parse("int3-g32-asym")
    w = _laplace((32, 96), gen)
    X = torch.randn(256, 96, generator=gen) * torch.linspace(0.1, 4.0, 96)
    H = X.t() @ X / 256
    cfg = RTN(clip_search=True, weighted=True)
    got = rtn(w, spec, cfg, hessian=H)
    assert _same(got, quantize(w, spec, *mse_clip_search(w, spec, hessian=H)))
    assert _same(rtn(w, spec, cfg, torch.ones(96), hessian=H), got)  # the Hessian wins over importance
    by_diag = quantize(w, spec, *mse_clip_search(w, spec, importance=torch.diag(H)))
    assert _same(rtn(w, spec, cfg, torch.diag(H)), by_diag)  # importance alone: as before

    def out_err(q):
        D = (w - q.dequantize()).double()
        return float(((D @ H.double()) * D).sum())

    assert out_err(got) <= out_err(rtn(w, spec))
    with pytest.raises(InputError, match="clip_search"):
        rtn(w, spec, RTN(), hessian=H)
    with pytest.raises(InputError, match="Hessian"):
        rtn(w, spec, cfg)

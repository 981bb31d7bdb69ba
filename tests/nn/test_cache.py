"""cached_weights(model): same outputs bit for bit, one dequantization per dtype, nothing left behind."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.formats import quantize
from lowbit.nn import QuantModule, cached_weights
from lowbit.nn.base import CACHE_ATTR


class Net(nn.Module):
    """Embedding 40x32 -> Linear 32->24 -> Conv1d over the sequence -> Linear 24->8, with a shared linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 32)
        self.fc = nn.Linear(32, 24)
        self.conv = nn.Conv1d(24, 24, 3, padding=1)
        self.head = nn.Linear(24, 8)
        self.head_again = self.head  # one module under two names

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc(self.embed(ids)))  # (B, T, 24)
        h = self.conv(h.transpose(1, 2)).transpose(1, 2)
        return self.head(h) + self.head_again(h)


def _model() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        m = Net().eval()
    return lowbit.quantize(m, lowbit.QuantPlan.uniform("int4-g16-asym", skip=()), progress=False)


def _ids():
    return torch.randint(0, 40, (2, 9), generator=torch.Generator().manual_seed(1))


def _quant(model):
    return [m for m in model.modules() if isinstance(m, QuantModule)]


def test_outputs_are_bit_identical_and_caches_go_away():
    model, x = _model(), _ids()
    assert len(_quant(model)) == 4
    with torch.no_grad():
        ref = model(x)
        with cached_weights(model) as m:
            assert m is model
            inside = [model(x) for _ in range(3)]
            for qm in _quant(model):
                cache = qm.__dict__[CACHE_ATTR]
                assert len(cache) == 1  # float32 only, computed once and reused
                assert qm.dequantized_weight() is qm.dequantized_weight()
        after = model(x)
    for y in inside + [after]:
        assert torch.equal(y, ref)
    for qm in _quant(model):
        assert CACHE_ATTR not in qm.__dict__
        assert qm.dequantized_weight() is not qm.dequantized_weight()
    assert CACHE_ATTR not in QuantModule.__dict__  # no class-level state


def test_one_entry_per_dtype():
    model = _model()
    fc = model.fc
    with cached_weights(model):
        w32, w16 = fc.dequantized_weight(), fc.dequantized_weight(torch.bfloat16)
        assert w16.dtype == torch.bfloat16 and len(fc.__dict__[CACHE_ATTR]) == 2
        assert torch.equal(w32, fc.quantized_weight().dequantize())
        y16 = fc(torch.randn(3, 32).to(torch.bfloat16))
        assert y16.dtype == torch.bfloat16 and fc.dequantized_weight(torch.bfloat16) is w16


def test_an_exception_still_clears_the_caches():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"):
        with cached_weights(model):
            model(_ids())
            raise RuntimeError("boom")
    assert all(CACHE_ATTR not in qm.__dict__ for qm in _quant(model))


def test_nested_blocks_keep_the_outer_cache():
    model, other = _model(), _model()
    with cached_weights(model):
        with cached_weights(model.fc):
            pass
        assert CACHE_ATTR in model.fc.__dict__  # the inner block created nothing, so removed nothing
        assert all(CACHE_ATTR not in qm.__dict__ for qm in _quant(other))  # per instance: other models untouched
    assert CACHE_ATTR not in model.fc.__dict__


def test_changing_the_weight_inside_clears_its_cache():
    model, x = _model(), _ids()
    fc = model.fc
    with torch.no_grad(), cached_weights(model):
        model(x)
        new = quantize(torch.randn(24, 32, generator=torch.Generator().manual_seed(5)), fc.spec)
        fc.set_quantized_weight(new)
        assert torch.equal(fc.dequantized_weight(), new.dequantize())
        model.to(torch.float64)  # .to() clears too
        assert len(fc.__dict__[CACHE_ATTR]) == 0

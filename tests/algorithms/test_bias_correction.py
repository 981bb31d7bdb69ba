"""Bias correction: the pure core against brute force, and its effect inside quantize()."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms.bias_correction import bias_correction
from lowbit.errors import InputError
from lowbit.formats import fake_quantize
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize
from lowbit.spec import QuantSpec


def test_linear_shift_equals_mean_output_difference():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(6, 8, generator=g)
    Wq = fake_quantize(W, QuantSpec.parse("int3-g4-asym"))
    x = torch.randn(500, 8, generator=g) + torch.linspace(-2, 3, 8)
    expected = (x @ (Wq - W).t()).mean(0)  # (6,)
    assert torch.allclose(bias_correction(Wq - W, x.mean(0)), expected, atol=1e-5)


@pytest.mark.parametrize("groups", [1, 2, 4])
def test_conv_shift_equals_mean_output_difference(groups):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(8, 4 // groups, 3, 3, generator=g)
    dW = fake_quantize(W, QuantSpec.parse("int4")) - W
    x = torch.randn(16, 4, 9, 9, generator=g) + torch.arange(4.0)[:, None, None]
    # circular padding: every input position enters every kernel tap equally often, so the identity is exact
    expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), dW, groups=groups).mean(dim=(0, 2, 3))  # (8,)
    got = bias_correction(dW, x.mean(dim=(0, 2, 3)), groups)
    assert torch.allclose(got, expected, atol=1e-4)


def _mean_shift(model_a, model_b, x):
    with torch.inference_mode():
        return (model_a(x) - model_b(x)).mean(0).abs().max().item()


def test_quantize_with_bias_correction_removes_the_mean_shift():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=0, bias=False), nn.Flatten(), nn.Linear(8 * 6 * 6, 5)).eval()
    data = torch.randn(64, 3, 8, 8) + 1.5  # inputs with a non-zero mean make the shift visible
    plain = quantize(copy.deepcopy(model), QuantPlan.uniform("int3-ch"), progress=False)
    corrected = quantize(copy.deepcopy(model), QuantPlan.uniform("int3-ch", bias_correction=True), data, progress=False)
    assert corrected[0].bias is not None  # created where the float conv had none
    assert _mean_shift(model, corrected, data) < 0.5 * _mean_shift(model, plain, data)


def test_bias_correction_needs_data_and_round_trips_in_recipes():
    model = nn.Sequential(nn.Linear(4, 4)).eval()
    plan = QuantPlan.uniform("int8", bias_correction=True)
    with pytest.raises(InputError, match="calibration data"):
        quantize(copy.deepcopy(model), plan, progress=False)
    assert QuantPlan.from_yaml(plan.to_yaml()) == plan
    assert "bias_correction: true" in plan.to_yaml()

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


# ---- analytic bias correction (DFQ Sec. 4.2.1): input means from the BatchNorm before each layer ----------


@pytest.mark.parametrize("clip", [None, 6.0, "per-channel"])
def test_expected_clamped_normal_matches_sampling(clip):
    from lowbit.algorithms.bias_correction import expected_clamped_normal

    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([-2.0, -0.5, 0.0, 0.7, 3.0, 5.5, 1.0])
    sigma = torch.tensor([1.0, 0.3, 2.0, 1.5, 0.5, 2.0, 0.0])  # the last: no spread, f(mu) exactly
    t = torch.tensor([6.0, 1.0, 6.0, 0.5, 2.0, 4.0, 6.0]) if clip == "per-channel" else clip
    z = mu + sigma * torch.randn(400_000, 7, generator=g)
    f = z.clamp(min=0) if t is None else torch.minimum(z.clamp(min=0), torch.as_tensor(t))
    got = expected_clamped_normal(mu, sigma, t)
    assert torch.allclose(got, f.mean(0), atol=0.01), (got, f.mean(0))
    assert torch.equal(expected_clamped_normal(mu, sigma, t, rectified=False), mu)  # no activation: the mean


def _with_measured_bn(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """Give every BatchNorm the running statistics of its input on ``x`` (as training would)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # a cumulative average: the statistics of x
    model.train()
    with torch.no_grad():
        model(x)
    return model.eval()


def _input_means(model: nn.Module, names: list[str], x: torch.Tensor) -> dict[str, torch.Tensor]:
    seen = {}
    modules = dict(model.named_modules())
    hooks = [modules[n].register_forward_pre_hook(
        lambda m, inp, n=n: seen.__setitem__(n, inp[0].transpose(0, 1).reshape(inp[0].shape[1], -1).mean(1)
                                             if inp[0].dim() > 2 else inp[0].mean(0))) for n in names]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("transform", [None, "fold_batchnorm", "equalize"])
def test_analytic_input_means_match_the_measured_ones(transform):
    from lowbit.models import tiny
    from lowbit.transforms import apply_transforms
    from lowbit.transforms.equalization import expected_input_means

    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    model = _with_measured_bn(tiny.tiny_cnn(), x)
    if transform is not None:
        apply_transforms(model, [transform])
    names = ["features.0", "features.3", "features.6", "features.9", "classifier"]
    means, why = expected_input_means(model, names)
    assert list(why) == ["features.0"] and "BatchNorm" in why["features.0"]  # the first conv sees the images
    measured = _input_means(model, list(means), x)
    for name, mean in means.items():
        scale = measured[name].abs().max()
        assert (mean - measured[name]).abs().max() <= 0.1 * scale, name  # pre-activations are near-Gaussian


def test_analytic_bias_correction_needs_no_data_and_removes_the_mean_shift():
    from lowbit.models import tiny

    x = torch.randn(256, 3, 32, 32, generator=torch.Generator().manual_seed(4))
    model = _with_measured_bn(tiny.tiny_cnn(), x)
    plan = QuantPlan.uniform("int3-ch", bias_correction="analytic")
    assert not plan.needs_data
    plain = quantize(copy.deepcopy(model), QuantPlan.uniform("int3-ch"), progress=False)
    corrected = quantize(copy.deepcopy(model), plan, progress=False)  # no data
    assert _mean_shift(model, corrected, x) < 0.5 * _mean_shift(model, plain, x)
    from lowbit.nn.state import CALIBRATION_ATTR

    assert corrected.__dict__[CALIBRATION_ATTR]["fallbacks"]["analytic bias correction -> none"] == ["features.0"]
    assert QuantPlan.from_yaml(plan.to_yaml()) == plan and "bias_correction: analytic" in plan.to_yaml()


def test_a_bad_bias_correction_value_is_refused():
    with pytest.raises(InputError, match="bias_correction must be true .* 'analytic'"):
        QuantPlan.uniform("int8", bias_correction="analytical")

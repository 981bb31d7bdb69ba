"""Data-aware algorithms on convolutions: GPTQ's Hessian from the patches a convolution multiplies (as the GPTQ
paper does for ResNets), and round to nearest, said up front, for the layers an algorithm cannot take."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from lowbit.calibration.capture import conv_patches
from lowbit.errors import InputError
from lowbit.nn.conv import QuantConv1d, QuantConv2d
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize

CONVS = [
    (lambda: nn.Conv2d(3, 5, 3, stride=2, padding=1), (2, 3, 9, 9)),
    (lambda: nn.Conv2d(3, 5, (3, 2), dilation=(2, 1), padding="same"), (2, 3, 9, 9)),
    (lambda: nn.Conv2d(3, 5, 3, padding=1, padding_mode="reflect"), (2, 3, 7, 7)),
    (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 16)),
    (lambda: nn.Conv1d(4, 6, 3, padding="same"), (2, 4, 16)),
    (lambda: nn.Conv1d(4, 6, 5, dilation=2, padding=3, padding_mode="circular"), (2, 4, 16)),
]


@pytest.mark.parametrize("build,shape", CONVS)
def test_patches_times_the_weight_are_the_convolution(build, shape):
    torch.manual_seed(0)
    conv, x = build(), torch.randn(shape)
    P = conv_patches(conv, x)  # (positions, in * kernel)
    got = P @ conv.weight.reshape(conv.out_channels, -1).t() + conv.bias
    want = conv(x).flatten(2).transpose(1, 2).reshape(-1, conv.out_channels)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_grouped_convolution_has_no_patch_matrix():
    with pytest.raises(InputError, match="groups=4"):
        conv_patches(nn.Conv2d(4, 4, 3, groups=4), torch.randn(1, 4, 5, 5))


def _output_error(conv: nn.Module, method: str, spec: str, x: torch.Tensor) -> float:
    ref = conv(x)
    model = nn.Sequential(conv)
    quantize(model, QuantPlan.uniform(spec, method=method), [x], progress=False)
    assert isinstance(model[0], (QuantConv1d, QuantConv2d))
    with torch.no_grad():
        return (model(x) - ref).pow(2).mean().item()


@pytest.mark.parametrize("dims", [1, 2])
def test_gptq_beats_round_to_nearest_on_a_convolution(dims):
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1) if dims == 2 else nn.Conv1d(16, 8, 3, padding=1)
    # correlated input channels, as real feature maps have: where GPTQ's error feedback pays
    mix = torch.randn(16, 16) / 4 + torch.eye(16)
    x = torch.randn(8, 16, *([12, 12] if dims == 2 else [64]))
    x = torch.einsum("ij,bj...->bi...", mix, x)
    with torch.no_grad():
        rtn = _output_error(_copy(conv), "rtn", "int3-ch-asym", x)
        gptq = _output_error(_copy(conv), "gptq", "int3-ch-asym", x)
    assert gptq < 0.8 * rtn, (gptq, rtn)


def _copy(conv: nn.Module) -> nn.Module:
    c = type(conv)(conv.in_channels, conv.out_channels, conv.kernel_size, padding=conv.padding)
    c.load_state_dict(conv.state_dict())
    return c.eval()


def test_layers_an_algorithm_cannot_take_fall_back_before_any_work(caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=4), nn.Conv2d(4, 8, 1), nn.Flatten(), nn.Linear(8 * 6 * 6, 2))
    x = torch.randn(4, 4, 8, 8)
    with caplog.at_level(logging.WARNING, logger="lowbit.quantizer"):
        quantize(model, QuantPlan.uniform("int4-ch-asym", method="gptq"), [x], progress=False)
    said = [r.getMessage() for r in caplog.records if "cannot take" in r.getMessage()]
    assert said == ["gptq cannot take 1 layer(s) that are a grouped Conv2d (groups=4): they use round to nearest "
                    "instead (0)"]
    caplog.clear()
    model = nn.Sequential(nn.Conv2d(4, 4, 3, groups=2), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with caplog.at_level(logging.WARNING, logger="lowbit.quantizer"):
        quantize(model, QuantPlan.uniform("int4-ch-asym", method="awq"), [x], progress=False)
    assert any("awq cannot take 1 layer(s) that are a grouped Conv2d (groups=2)" in r.getMessage()
               for r in caplog.records)
    assert isinstance(model[0], QuantConv2d) and model[0].input_scale is None


@pytest.mark.parametrize("dims", [1, 2])
def test_awq_scales_a_convolution_per_input_channel(dims, tmp_path):
    """AWQ on a convolution: one scale per input channel (its kernel positions share it), output error no worse
    than round to nearest's on inputs with outlier channels, and the scale survives save and load."""
    import lowbit

    torch.manual_seed(0)
    conv = nn.Conv2d(16, 8, 3, padding=1) if dims == 2 else nn.Conv1d(16, 8, 3, padding=1)
    x = torch.randn(8, 16, *([12, 12] if dims == 2 else [64]))
    x[:, :2] *= 20  # two outlier channels, where AWQ's scales pay
    with torch.no_grad():
        rtn = _output_error(_copy(conv), "rtn", "int3-ch-asym", x)
        model = nn.Sequential(_copy(conv))
        ref = conv(x)
        quantize(model, QuantPlan.uniform("int3-ch-asym", method="awq"), [x], progress=False)
        awq = (model(x) - ref).pow(2).mean().item()
    assert awq <= rtn, (awq, rtn)
    q = model[0]
    assert q.input_scale is not None and q.input_scale.shape == (16,) and not torch.all(q.input_scale == 1)
    loaded = lowbit.load(lowbit.save(model, tmp_path / "a"), model=nn.Sequential(_copy(conv)))
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_per_token_activations_on_a_convolution_stay_float_with_a_warning(caplog):
    """A convolution's input is quantized per tensor only: a uniform W8A8 per-token plan keeps its activations
    float (weights int8), says so before any work, and records it."""
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 6, 2))
    with caplog.at_level(logging.WARNING, logger="lowbit.quantizer"):
        quantize(model, QuantPlan.uniform("int8", act="int8-token"), progress=False)
    assert isinstance(model[0], QuantConv1d) and model[0].act is None
    assert model[2].act is not None and model[2].act.spec.granularity == "token"
    assert any("1 convolution(s) keep float activations" in r.getMessage() for r in caplog.records)
    assert model.lowbit_calibration["fallbacks"] == {"activations int8-token:dynamic -> float": ["0"]}

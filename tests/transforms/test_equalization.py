"""BatchNorm folding and cross-layer equalization: exact in float, ranges equalized, undo and save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.io import load, save
from lowbit.models import tiny
from lowbit.models.fmnist import skeleton
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize
from lowbit.transforms import apply_transforms
from lowbit.transforms.equalization import ClampChannels, equalization_scales, layer_pairs


def _with_random_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.3)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) * 2 + 0.2)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2 + 0.5)
    return model.eval()


class SharedReLU6(nn.Module):
    """conv -> BN -> relu6 -> depthwise -> BN -> relu6 (the same module) -> 1x1 conv, as EfficientNet-Lite."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn_a = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn_dw = nn.BatchNorm2d(8)
        self.act = nn.ReLU6()
        self.pw = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.pw(self.act(self.bn_dw(self.dw(self.act(self.bn_a(self.a(x)))))))


MODELS = {"tiny-cnn": (lambda: _with_random_bn(tiny.tiny_cnn()), (4, 3, 32, 32)),
          "fmnist-resnet": (lambda: _with_random_bn(skeleton("fmnist-resnet")), (4, 1, 28, 28)),
          "shared-relu6": (lambda: _with_random_bn(SharedReLU6()), (4, 3, 16, 16))}


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("transform", ["fold_batchnorm", "equalize"])
def test_outputs_are_unchanged_and_undo_restores_the_model(name, transform):
    build, shape = MODELS[name]
    model = build()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2
    ref = model(x)
    state = copy.deepcopy(model.state_dict())
    originals = apply_transforms(model, [transform])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    out = model(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    originals.restore()
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items()) and model.state_dict().keys() == state.keys()


def test_equalized_pairs_have_equal_ranges_and_relu6_becomes_a_per_channel_clip():
    model = _with_random_bn(tiny.tiny_cnn())
    folded = copy.deepcopy(model)
    apply_transforms(folded, ["fold_batchnorm"])
    pairs = layer_pairs(folded)
    assert [p.clip for p in pairs] == [6.0, 6.0, 6.0]  # conv -> dw -> pw -> conv, each behind its own ReLU6
    apply_transforms(model, ["equalize"])
    modules = dict(model.named_modules())
    for p in pairs:
        a, b = modules[p.a], modules[p.b]
        r1 = a.weight.abs().reshape(a.weight.shape[0], -1).amax(1)
        s = equalization_scales(a.weight, b.weight, b.groups)
        assert torch.allclose(s, torch.ones_like(s), atol=1e-4), "a converged pair needs no further scaling"
        assert r1.min() > 0
        assert isinstance(modules[p.act], ClampChannels)
        assert not torch.allclose(modules[p.act].clip_max, torch.full_like(modules[p.act].clip_max, 6.0))


def test_a_relu6_called_at_two_places_is_left_unscaled():
    model = _with_random_bn(SharedReLU6())
    folded = copy.deepcopy(model)
    apply_transforms(folded, ["fold_batchnorm"])
    assert [(p.a, p.b, p.act) for p in layer_pairs(folded)] == [("a", "dw", None), ("dw", "pw", None)]
    w_dw = folded.dw.weight.clone()
    apply_transforms(model, ["equalize"])
    assert isinstance(model.act, nn.ReLU6)
    assert torch.equal(model.dw.weight, w_dw)  # its pairs were skipped: scaling would move the clip


def test_depthwise_scales_follow_their_channel():
    W1 = torch.tensor([[4.0], [1.0]]).reshape(2, 1, 1, 1)  # A: 2 output channels
    W2 = torch.tensor([1.0, 4.0]).reshape(2, 1, 1, 1)  # B: depthwise over those 2 channels
    s = equalization_scales(W1, W2, groups=2)
    assert torch.allclose(s, torch.tensor([2.0, 0.5]))  # both ranges become sqrt(4 * 1) = 2


def test_a_layer_with_zero_range_keeps_scale_one():
    s = equalization_scales(torch.zeros(3, 4), torch.randn(5, 3))
    assert torch.equal(s, torch.ones(3))


@pytest.mark.parametrize("transform", ["fold_batchnorm", "equalize"])
def test_quantized_after_the_transform_saves_and_loads_the_same(tmp_path, transform):
    model = _with_random_bn(tiny.tiny_cnn())
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    plan = QuantPlan.uniform("int8", skip=())
    plan = QuantPlan(plan.rules, plan.skip, transforms=(transform,))
    quantize(model, plan, progress=False)
    out = model(x)
    loaded = load(save(model, tmp_path / "art", plan=plan), model=tiny.tiny_cnn(seed=5))
    assert torch.equal(loaded(x), out)


def test_an_untraceable_model_is_refused_and_left_unchanged():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.c = nn.Conv2d(3, 3, 1)
            self.bn = nn.BatchNorm2d(3)

        def forward(self, x):
            return self.bn(self.c(x)) if x.sum() > 0 else x

    model = _with_random_bn(Branchy())
    with pytest.raises(InputError, match="cannot trace Branchy"):
        apply_transforms(model, ["fold_batchnorm"])
    assert isinstance(model.bn, nn.BatchNorm2d)

"""High-bias absorption (DFQ): the always-passed part of a ReLU/ReLU6 input moves into the next layer's bias."""

from __future__ import annotations

import copy
import logging

import torch
from torch import nn

from lowbit.io import load, save
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize
from lowbit.transforms import apply_transforms
from lowbit.transforms.equalization import ClampChannels


class _Net(nn.Module):
    """conv 3x3 -> BN -> ReLU -> conv 1x1 -> BN -> ReLU6 -> conv 1x1 -> BN -> ReLU -> conv 3x3 (padded)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.bn1, self.relu = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU()
        self.c2, self.bn2, self.relu6 = nn.Conv2d(8, 6, 1), nn.BatchNorm2d(6), nn.ReLU6()
        self.c3, self.bn3, self.relu3 = nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU()
        self.c4 = nn.Conv2d(5, 4, 3, padding=1)  # padded: its pair keeps its biases

    def forward(self, x):
        x = self.relu(self.bn1(self.c1(x)))
        x = self.relu6(self.bn2(self.c2(x)))
        return self.c4(self.relu3(self.bn3(self.c3(x))))


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = _Net()
    g = torch.Generator().manual_seed(1)
    for bn in (net.bn1, net.bn2, net.bn3):  # high biases (beta well above 3 gamma), centred statistics
        n = bn.num_features
        bn.running_mean.zero_()
        bn.running_var.fill_(1.0)
        bn.weight.data.copy_(torch.rand(n, generator=g) * 0.2 + 0.1)
        bn.bias.data.copy_(torch.rand(n, generator=g) * 2 + 1.0)
    for c in (net.c1, net.c2, net.c3):  # small weights: every pre-activation stays within 3 gamma of beta
        c.weight.data.mul_(0.05)
    return net.eval()


def _x(seed: int = 2) -> torch.Tensor:
    return torch.randn(2, 3, 10, 10, generator=torch.Generator().manual_seed(seed))


def test_outputs_are_unchanged_where_pre_activations_stay_above_the_absorbed_part_and_undo_restores(caplog):
    model = _net()
    x = _x()
    ref = model(x)
    state = copy.deepcopy(model.state_dict())
    c1_bias = model.bn1.bias.detach() - 3 * model.bn1.weight.detach()  # c = beta - 3 |gamma| (> 0 here)
    with caplog.at_level(logging.INFO, logger="lowbit.transforms.bias_absorption"):
        originals = apply_transforms(model, ["absorb_bias"])
    assert "2 layer pair(s)" in caplog.text and "pads its input: c3 -> c4" in caplog.text
    assert isinstance(model.relu6, ClampChannels) and float(model.relu6.clip_max.max()) < 6.0
    out = model(x)
    assert (out - ref).abs().max() <= 1e-5 * ref.abs().max()
    with torch.no_grad():  # the first activation's range is lower by c: what absorption is for
        before = torch.relu(nn.functional.conv2d(x, state["c1.weight"], None, 1, 1) *
                            (state["bn1.weight"] / torch.sqrt(state["bn1.running_var"] + 1e-5))[:, None, None] +
                            state["bn1.bias"][:, None, None])
        after = model.relu(model.c1(x))
    assert torch.allclose(before - after, c1_bias[:, None, None].expand_as(before), atol=1e-5)
    originals.restore()
    assert isinstance(model.relu6, nn.ReLU6)
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def _output_of(model: nn.Module, x: torch.Tensor, name: str) -> torch.Tensor:
    seen = {}
    h = model.get_submodule(name).register_forward_hook(lambda m, a, y: seen.setdefault("y", y))
    with torch.no_grad():
        model(x)
    h.remove()
    return seen["y"]


def test_an_input_below_the_absorbed_part_is_where_the_output_changes():
    """Exact only above c: a pre-activation below it is where the Gaussian assumption fails."""
    model = _net()
    small, large = _x(), _x() * 50  # at 50x some first-layer pre-activations fall below beta - 3 gamma
    ref = [_output_of(model, x, "relu") for x in (small, large)]
    c1 = (model.bn1.bias - 3 * model.bn1.weight.abs() / torch.sqrt(torch.tensor(1 + 1e-5))).detach()
    apply_transforms(model, ["absorb_bias"])
    # what the next layer sees, counting the part its bias now adds: relu(y - c) + c
    got = [_output_of(model, x, "relu") + c1[:, None, None] for x in (small, large)]
    assert (got[0] - ref[0]).abs().max() <= 1e-5 * ref[0].abs().max()
    assert (got[1] - ref[1]).abs().max() > 0.1 * ref[1].abs().max()
    below = ref[1] < c1[:, None, None] - 1e-5  # relu(y) < c: y < c
    assert torch.allclose(got[1][~below], ref[1][~below], atol=1e-4) and bool(below.any())


def test_quantized_after_absorption_saves_and_loads_the_same(tmp_path):
    model = _net()
    plan = QuantPlan.uniform("int8", skip=())
    plan = QuantPlan(plan.rules, plan.skip, transforms=("equalize", "absorb_bias"))
    quantize(model, plan, progress=False)
    x = _x(3)
    out = model(x)
    loaded = load(save(model, tmp_path / "art", plan=plan), model=_Net().eval())
    assert torch.equal(loaded(x), out)

"""int8_conv_graph: BatchNorm folding, fused activations and uint8 links between int8 convolutions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.kernels import cpu_features, use_kernels
from lowbit.kernels.conv_graph import FusedInt8Conv, int8_conv_graph
from lowbit.plan import QuantPlan, Rule
from lowbit.quantizer import quantize

# numerics of the oneDNN int8 convolution: only where it is exact (and chosen); elsewhere it is declined
needs_vnni = pytest.mark.skipif(not cpu_features.has_vnni(), reason="needs a CPU with VNNI (avx512_vnni / avx_vnni "
                                "/ amx_int8): without it oneDNN's int8 convolution saturates 16-bit sums and "
                                "the dispatch declines it")


@pytest.fixture
def pretend_vnni(monkeypatch):
    """Dispatch as on a CPU with VNNI, to test how the graph is built (not its numbers) on any CPU."""
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: True)


class _Net(nn.Module):
    """stem conv-BN-ReLU6 -> depthwise conv-BN-ReLU -> pointwise conv-BN, + a residual branch, pool, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn0 = nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.dw, self.bn1 = nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16)
        self.pw, self.bn2 = nn.Conv2d(16, 16, 1, bias=True), nn.BatchNorm2d(16)
        self.act6, self.act = nn.ReLU6(), nn.ReLU()
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.act6(self.bn0(self.stem(x)))
        y = self.act(self.bn1(self.dw(x)))
        y = self.bn2(self.pw(y)) + x  # the stem's output has two users: it stays float
        return self.head(y.mean((2, 3)))


def _model(act: str = "int8-tensor", seed: int = 0):
    torch.manual_seed(seed)
    net = _Net()
    for bn in (net.bn0, net.bn1, net.bn2):  # non-trivial statistics, some negative gains
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.05, 2.0)
        bn.weight.data.uniform_(-1.5, 1.5)
        bn.bias.data.uniform_(-0.3, 0.3)
    net.eval()
    plan = QuantPlan((Rule("head", "int8"), Rule("*", "int8", act={"spec": act, "dynamic": False,
                                                                   "observer": "minmax"})))
    calib = [torch.randn(4, 3, 20, 20, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return quantize(net, plan, calib, progress=False)


def _x(seed: int = 7) -> torch.Tensor:
    return torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(seed))


def test_graph_folds_fuses_and_links_the_int8_convolutions(pretend_vnni):
    q = _model()
    use_kernels(q)
    gm, report = int8_conv_graph(q)
    assert report.convs == 3 and sorted(report.folded) == ["bn0", "bn1", "bn2"] and report.activations == 2
    assert report.links == [("dw", "pw")]  # stem -> dw is not linked: the stem's output feeds the residual too
    assert report.declined == {}
    fused = {n: type(m).__name__ for n, m in gm.named_children()}
    assert list(fused.values()).count("FusedInt8Conv") == 3


@needs_vnni
@pytest.mark.parametrize("act", ["int8-tensor", "int8-tensor-asym"])
def test_fused_graph_matches_the_reference_model(act):
    q = _model(act)
    x = _x()
    with torch.no_grad():
        ref = q(x)  # reference path: dequantize, float BatchNorm and activations
    use_kernels(q)
    gm, report = int8_conv_graph(q)
    assert report.convs == 3 and len(report.links) == 1
    with torch.no_grad():
        y = gm(x)
    # exact in real arithmetic; float rounding can move a requantized code across a rounding boundary
    assert float((y - ref).abs().max()) < 0.02 * float(ref.abs().max())
    with torch.no_grad():
        assert torch.equal(q(x), q(x))  # the model itself is unchanged and still runs its kernels


@pytest.mark.parametrize("act", ["int7-tensor", "int7-tensor-asym", "int6-tensor"])
def test_seven_bit_activations_run_the_int8_graph_exactly_without_vnni(monkeypatch, act):
    """Codes in 0..127 never saturate oneDNN's pairwise int16 sums: exact on any x86 CPU, VNNI or not."""
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)
    q = _model(act)
    x = _x() * 3  # beyond the calibrated range: the links must clip as the consumers' quantizers clamp
    with torch.no_grad():
        ref = q(x)
    use_kernels(q)
    gm, report = int8_conv_graph(q)
    assert report.convs == 3 and report.links == [("dw", "pw")] and report.declined == {}
    with torch.no_grad():
        y = gm(x)
        direct = q(x)  # each convolution on its own kernel, float in and out
    assert float((direct - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    assert float((y - ref).abs().max()) < 0.02 * float(ref.abs().max())


def test_eight_bit_activations_without_vnni_say_that_seven_bits_would_run(monkeypatch):
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)
    q = _model("int8-tensor")
    from lowbit.kernels import conv_int8

    assert conv_int8.why_not(q.dw) == cpu_features.NO_VNNI and "7 bits or fewer" in cpu_features.NO_VNNI


@needs_vnni
def test_link_writes_the_consumers_own_input_codes():
    q = _model()
    use_kernels(q)
    gm, _ = int8_conv_graph(q)
    x = _x(3)
    seen = {}
    pw_fused = next(m for m in gm.modules() if isinstance(m, FusedInt8Conv) and m.conv is q.pw)
    h = pw_fused.register_forward_pre_hook(lambda m, a: seen.__setitem__("codes", a[0]))
    with torch.no_grad():
        gm(x)
        y = q.act(q.bn1(q.dw.reference(q.act6(q.bn0(q.stem.reference(x))))))  # the float input of pw
    h.remove()
    codes = seen["codes"]
    assert codes.dtype == torch.uint8
    from lowbit.kernels import conv_int8
    from lowbit.nn.base import KERNEL_ATTR

    own = conv_int8.input_codes(q.pw, q.pw.__dict__[KERNEL_ATTR].state, y)
    diff = (codes.int() - own.int()).abs()
    assert int(diff.max()) <= 1 and float((diff > 0).float().mean()) < 0.01


def test_a_conv_without_bn_or_next_conv_is_left_to_its_kernel_and_training_mode_is_refused(pretend_vnni):
    q = quantize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten()).eval(),
                 QuantPlan((Rule("*", "int8", act={"spec": "int8-tensor", "dynamic": False}),)),
                 [torch.randn(2, 3, 8, 8)], progress=False)
    use_kernels(q)
    gm, report = int8_conv_graph(q)
    assert report.convs == 1 and not report.folded and not report.links
    assert not any(isinstance(m, FusedInt8Conv) for m in gm.modules())
    q.train()
    with pytest.raises(InputError, match="eval mode"):
        int8_conv_graph(q)


def test_convs_without_the_int8_kernel_are_not_touched():
    q = _model()
    gm, report = int8_conv_graph(copy.deepcopy(q))  # no use_kernels: every conv is on the reference path
    assert report.convs == 0 and not any(isinstance(m, FusedInt8Conv) for m in gm.modules())
    assert sorted(report.declined) == ["dw", "pw", "stem"]
    with torch.no_grad():
        assert torch.allclose(gm(_x()), q(_x()))


def test_the_graph_refuses_to_run_once_its_kernels_are_released(pretend_vnni):
    from lowbit.kernels import release_kernels

    q = _model()
    use_kernels(q)
    gm, _ = int8_conv_graph(q)
    release_kernels(q)
    with pytest.raises(InputError, match="lost its int8 kernel"):
        gm(_x())


def test_without_vnni_no_convolution_is_given_the_int8_kernel_or_chained(monkeypatch):
    """On a CPU without VNNI (as detected; monkeypatched so this runs everywhere) the dispatch declines the
    oneDNN int8 convolution with the reason, and int8_conv_graph builds nothing and says why."""
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)
    q = _model()
    x = _x()
    kernels = use_kernels(q)
    assert kernels.chosen["stem"] is None and kernels.chosen["head"] in ("int8-weight-avx2", "int8-weight-bf16")
    why = kernels.reasons["stem"]["conv-int8-onednn"]
    assert "no VNNI" in why and "saturat" in why and "reference path" in why
    assert "stem stays on the reference path" in kernels.describe()
    gm, report = int8_conv_graph(q)
    assert report.convs == 0 and not any(isinstance(m, FusedInt8Conv) for m in gm.modules())
    assert report.declined == {"stem": cpu_features.NO_VNNI, "dw": cpu_features.NO_VNNI, "pw": cpu_features.NO_VNNI}
    assert "no VNNI" in report.describe() and "stem and 2 more" in report.describe()
    with torch.no_grad():
        assert torch.equal(gm(x), q(x))  # the convolutions on the reference path, the head on its kernel


def test_int8_conv_graph_never_chains_a_kernel_attached_while_vnni_was_assumed(monkeypatch):
    """The graph checks the CPU itself: a convolution that holds the int8 kernel is still left unchained."""
    q = _model()
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: True)
    use_kernels(q)
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)
    gm, report = int8_conv_graph(q)
    assert report.convs == 0 and set(report.declined.values()) == {cpu_features.NO_VNNI}
    assert not any(isinstance(m, FusedInt8Conv) for m in gm.modules())

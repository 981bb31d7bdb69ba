"""int8_conv_graph: BatchNorm folding, fused activations and uint8 links between int8 convolutions."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit import cpu_features
from lowbit.kernels import use_kernels
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
        self.residual_codes = None  # the reference with the residual as the int8 graph sums it (see _as_codes)

    def forward(self, x):
        x = self.act6(self.bn0(self.stem(x)))
        y = self.act(self.bn1(self.dw(x)))
        r = x if self.residual_codes is None else self.residual_codes(self.dw, x)
        y = self.bn2(self.pw(y)) + r  # a residual add: fused into pw, summing the stem's codes
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


def _as_codes(conv, x):
    """``x`` as ``conv``'s input codes represent it: what a residual add of the int8 graph sums."""
    from lowbit.kernels import conv_int8
    from lowbit.nn.base import KERNEL_ATTR

    st = conv.__dict__[KERNEL_ATTR].state
    saved, conv.input_padding = conv.input_padding, None
    try:
        codes = conv_int8.input_codes(conv, st, x)
    finally:
        conv.input_padding = saved
    return (codes.float() - st["x_zp"]) * st["x_scale"]


def _x(seed: int = 7) -> torch.Tensor:
    return torch.randn(3, 3, 20, 20, generator=torch.Generator().manual_seed(seed))


def test_graph_folds_fuses_and_links_the_int8_convolutions(pretend_vnni):
    q = _model()
    use_kernels(q)
    gm, report = int8_conv_graph(q)
    assert report.convs == 3 and sorted(report.folded) == ["bn0", "bn1", "bn2"] and report.activations == 2
    # the stem's output feeds dw and the residual add: it is written as dw's codes, which the add sums
    assert report.links == [("stem", "dw"), ("dw", "pw")] and report.adds == ["add"]
    assert report.integer_adds == []  # the sum feeds the float mean: written as float
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
    assert report.convs == 3 and len(report.links) == 2
    with torch.no_grad():
        y = gm(x)
        q.residual_codes = _as_codes
        ref_codes = q(x)  # the residual as the graph sums it: dw's input codes
        q.residual_codes = None
    # exact in real arithmetic; float rounding can move a requantized code across a rounding boundary
    assert float((y - ref_codes).abs().max()) < 0.02 * float(ref.abs().max())
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
    assert report.convs == 3 and report.links == [("stem", "dw"), ("dw", "pw")] and report.declined == {}
    with torch.no_grad():
        y = gm(x)
        direct = q(x)  # each convolution on its own kernel, float in and out
        q.residual_codes = _as_codes
        ref_codes = q(x)  # the reference with the residual rounded (and clipped) to dw's input codes
        q.residual_codes = None
    assert float((direct - ref).abs().max()) < 1e-4 * float(ref.abs().max())
    assert float((y - ref_codes).abs().max()) < 0.02 * float(ref.abs().max())


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


class _Stream(nn.Module):
    """An inverted-residual stream (EfficientNet-style): stem, two blocks expand-depthwise-project whose sums
    feed the next block and the next add, a head convolution, pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()

        def cbr(cin, cout, k=1, groups=1, act=True):
            layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
            return nn.Sequential(*layers, *([nn.ReLU6()] if act else []))

        self.stem = cbr(3, 8, 3)
        self.blocks = nn.ModuleList(nn.Sequential(cbr(8, 16), cbr(16, 16, 3, groups=16), cbr(16, 8, act=False))
                                    for _ in range(2))  # expand, depthwise, project
        self.head, self.fc = cbr(8, 16), nn.Linear(16, 10)
        self.residual_codes = None

    def forward(self, x):
        x = self.stem(x)
        for b in self.blocks:
            r = x if self.residual_codes is None else self.residual_codes(b[0][0], x)
            x = b(x) + r
        return self.fc(self.head(x).mean((2, 3)))


class _Basic(nn.Module):
    """A ResNet basic block with a strided 1x1 shortcut: add, then ReLU."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.conv1, self.bn1 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.down, self.bnd = nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16)
        self.relu1, self.relu2, self.fc = nn.ReLU(), nn.ReLU(), nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.fc(self.relu2(y + self.bnd(self.down(x))).mean((2, 3)))


class _InputResidual(nn.Module):
    """The model's input is the residual, and is read again after the add."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.bn(self.conv(x)) + x + x.mean()


def _quantized(net: nn.Module, act: str = "int7-tensor-asym", classifier: bool = False) -> nn.Module:
    """``net`` W8 with static ``act`` inputs; the classifier ``fc`` weight-only unless ``classifier``."""
    torch.manual_seed(1)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.05, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.3, 0.3)
    net.eval()
    rules = (Rule("*", "int8", act={"spec": act, "dynamic": False, "observer": "minmax"}),)
    plan = QuantPlan(rules if classifier else (Rule("fc", "int8"), *rules))
    calib = [torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return quantize(net, plan, calib, progress=False)


def _graphed(q: nn.Module, seed: int, n: int = 2):
    """An input ``(n, 3, 12, 12)``, ``q``'s reference output on it, then ``q``'s int8 graph (after use_kernels)."""
    x = torch.randn(n, 3, 12, 12, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        ref = q(x)
    use_kernels(q)
    gm, report = int8_conv_graph(q)
    return x, ref, gm, report


@pytest.mark.parametrize("act", ["int7-tensor-asym", "int7-tensor"])
def test_an_inverted_residual_stream_stays_integer_between_blocks(monkeypatch, act):
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)  # 7-bit codes: exact on any x86 CPU
    q = _quantized(_Stream(), act)
    x = torch.randn(3, 3, 12, 12, generator=torch.Generator().manual_seed(5))
    use_kernels(q)
    gm, report = int8_conv_graph(q)
    assert report.convs == 8 and report.declined == {}
    assert report.adds == report.integer_adds and len(report.adds) == 2  # both sums read and write codes
    assert report.heads == []  # the classifier is weight-only: the pool averages float
    assert ("stem.0", "blocks.0.0.0") in report.links and ("blocks.1.2.0", "head.0") in report.links
    seen = []
    hooks = [m.register_forward_pre_hook(lambda m, a: seen.append(a[1].dtype))
             for m in gm.modules() if isinstance(m, FusedInt8Conv) and m.add is not None]
    with torch.no_grad():
        y = gm(x)
        q.residual_codes = _as_codes
        ref_codes = q(x)  # the reference path with each residual rounded to the next expansion's input codes
        q.residual_codes = None
        ref = q(x)
    for h in hooks:
        h.remove()
    assert seen == [torch.uint8, torch.uint8]
    assert float((y - ref_codes).abs().max()) < 0.02 * float(ref_codes.abs().max())
    assert float((y - ref).abs().max()) < 0.1 * float(ref.abs().max())  # the stream's rounding, bounded


def test_a_basic_block_fuses_its_add_and_relu_in_float(monkeypatch):
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)
    q = _quantized(_Basic())
    x, ref, gm, report = _graphed(q, 6)
    # the shortcut's output has no int8 reader to take codes from: the add sums in float, ReLU fused after it
    assert report.adds == ["add"] and report.integer_adds == []
    fused = next(m for m in gm.modules() if isinstance(m, FusedInt8Conv) and m.add is not None)
    assert fused.add.relu and fused.add.residual_q is None
    assert not any(n.target is torch.relu or n.op == "call_module" and n.target == "relu2" for n in gm.graph.nodes)
    with torch.no_grad():
        assert float((gm(x) - ref).abs().max()) < 0.02 * float(ref.abs().max())


def test_a_residual_read_again_is_copied_before_the_kernel_writes_into_it(monkeypatch):
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)
    q = _quantized(_InputResidual())
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(8))
    keep = x.clone()
    with torch.no_grad():
        ref = q(x)
    use_kernels(q)
    gm, report = int8_conv_graph(q)
    assert report.adds == ["add"]
    fused = next(m for m in gm.modules() if isinstance(m, FusedInt8Conv))
    assert fused.add.clone and fused.add.residual_q is None
    with torch.no_grad():
        y = gm(x)
    assert torch.equal(x, keep)  # the caller's tensor is not written into
    assert float((y - ref).abs().max()) < 0.02 * float(ref.abs().max())


class _BroadcastAdd(nn.Module):
    """A per-channel offset added after a convolution: not a residual of the output's shape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.offset = nn.Parameter(torch.linspace(-1, 1, 8).reshape(1, 8, 1, 1))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.bn(self.conv(x)) + self.offset).mean((2, 3))


def test_a_broadcast_operand_is_added_in_float(monkeypatch):
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)
    q = _quantized(_BroadcastAdd())
    offset = q.offset.detach().clone()
    x, ref, gm, report = _graphed(q, 9)
    assert report.adds == ["add"]
    with torch.no_grad():
        y = gm(x)
    assert torch.equal(q.offset, offset)  # the parameter is not written into
    assert float((y - ref).abs().max()) < 0.02 * float(ref.abs().max())


class _Concat(nn.Module):
    """Two branches (1x1 with ReLU6, 3x3 with ReLU) concatenated along channels, read by a 1x1 convolution."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(8, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU6())
        self.b = nn.Sequential(nn.Conv2d(8, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.merge = nn.Conv2d(10, 5, 1)

    def forward(self, x):
        x = self.stem(x)
        return self.merge(torch.cat([self.a(x), self.b(x)], dim=1)).mean((2, 3))


def test_a_concatenation_read_by_an_int8_convolution_joins_codes(monkeypatch):
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)  # 7-bit codes: exact on any x86 CPU
    q = _quantized(_Concat())
    x, ref, gm, report = _graphed(q, 12)
    assert ("a.0", "merge") in report.links and ("b.0", "merge") in report.links, report.describe()
    merge = next(m for m in gm.modules() if isinstance(m, FusedInt8Conv) and m.conv is q.merge)
    seen = []
    h = merge.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        y = gm(x)
    h.remove()
    assert seen[0].dtype == torch.uint8 and seen[0].shape[1] == 10
    assert float((y - ref).abs().max()) < 0.02 * float(ref.abs().max())

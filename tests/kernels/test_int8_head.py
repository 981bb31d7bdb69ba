"""int8_conv_graph's classifier end: pooled codes and the integer classifier (lowbit.kernels.int8_head)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit import cpu_features
from lowbit.kernels import use_kernels
from lowbit.kernels.conv_graph import int8_conv_graph

from test_conv_graph import _Basic, _graphed, _quantized, _Stream


class _PoolHead(nn.Module):
    """An EfficientNet-style end: head convolution, pooling module, view, dropout, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.act = nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU6()
        self.pool, self.drop, self.fc = nn.AdaptiveAvgPool2d(1), nn.Dropout(0.2), nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(self.act(self.bn(self.conv(x))))
        return self.fc(self.drop(x.view(x.size(0), -1)))


@pytest.mark.parametrize("net, last", [(_Stream, "head.0"), (_PoolHead, "conv")])
@pytest.mark.parametrize("act", ["int7-tensor-asym", "int7-tensor"])
def test_the_classifier_end_pools_codes_and_multiplies_them_in_integers(monkeypatch, net, last, act):
    """The last convolution writes the classifier's input codes, the pool averages them in int32 (one rounding),
    the classifier's integer kernel reads them; the logits stay within the pooled rounding of the reference."""
    from lowbit.kernels.int8_head import CodeMeanPool, Int8LinearCodes

    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)  # 7-bit codes: exact on any x86 CPU
    q = _quantized(net(), act, classifier=True)
    x, ref, gm, report = _graphed(q, 11, n=3)
    assert report.heads == ["fc"] and (last, "fc") in report.links, report.describe()
    seen = {}
    pool = next(m for m in gm.modules() if isinstance(m, CodeMeanPool))
    head = next(m for m in gm.modules() if isinstance(m, Int8LinearCodes))
    hooks = [pool.register_forward_hook(lambda m, a, y: seen.update(pool_in=a[0], pool_out=y)),
             head.register_forward_hook(lambda m, a, y: seen.update(fc_in=a[0], fc_out=y))]
    with torch.no_grad():
        y = gm(x)
    for h in hooks:
        h.remove()
    codes = seen["pool_in"]
    assert codes.dtype == torch.uint8 and seen["fc_in"].dtype == torch.uint8
    from lowbit.kernels.int8_head import codes_reader_state

    st = codes_reader_state(q.fc)
    (t1, z1), _ = pool.in_q, pool.out_q
    assert pool.out_q == (st["x_scale"], st["x_zp"], 2 ** st["x_bits"] - 1)  # the classifier's own input codes
    assert t1 * (2 ** st["x_bits"] - 1) == pytest.approx(6.0)  # the convolution's codes span ReLU6's 0..6
    exact_mean = ((codes.double() - z1) * t1).mean((2, 3)).reshape(seen["fc_in"].shape)  # the values they stand for
    requantized = torch.floor(exact_mean / st["x_scale"] + st["x_zp"] + 0.5).clamp(0, 2 ** st["x_bits"] - 1)
    assert (seen["fc_in"].double() - requantized).abs().max() <= 1  # one rounding, half up (float ties aside)
    assert float((seen["fc_in"].double() != requantized).float().mean()) < 0.05
    with torch.no_grad():  # the integer product equals the reference linear on the values the codes stand for
        direct = q.fc.reference((seen["fc_in"].float() - st["x_zp"]) * st["x_scale"])
    assert float((seen["fc_out"] - direct).abs().max()) < 1e-4 * float(direct.abs().max())
    assert float((y - ref).abs().max()) < 0.1 * float(ref.abs().max())  # links, stream and pooled codes rounding


def test_code_mean_pool_requantizes_the_mean_once_and_refuses_float():
    from lowbit.kernels.int8_head import CodeMeanPool

    codes = torch.tensor([[[[1, 2], [2, 2]], [[0, 1], [1, 0]], [[255, 255], [255, 254]]]], dtype=torch.uint8)
    same = CodeMeanPool(False, (0.1, 0), (0.1, 0, 255))
    assert same(codes).tolist() == [[2, 1, 255]]  # 1.75 -> 2, 0.5 -> 1 (half up), 254.75 -> 255
    # to codes of twice the step with zero point 10: (mean - 0) * 0.1 / 0.2 + 10, saturating at 127
    assert CodeMeanPool(False, (0.1, 0), (0.2, 10, 127))(codes).tolist() == [[11, 10, 127]]
    assert CodeMeanPool(True, (0.1, 0), (0.1, 0, 255))(codes).shape == (1, 3, 1, 1)
    with pytest.raises(InputError, match="uint8 codes"):
        same(codes.float())


def test_a_pool_after_an_unbounded_activation_stays_float_and_says_why(monkeypatch):
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)
    q = _quantized(_Basic(), classifier=True)  # add -> ReLU -> mean -> fc: no range for codes before the pool
    use_kernels(q)
    gm, report = int8_conv_graph(q)
    assert report.heads == [] and "unbounded activation" in report.declined["fc"]
    x = torch.randn(2, 3, 12, 12, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        ref = q(x)
        assert float((gm(x) - ref).abs().max()) < 0.02 * float(ref.abs().max())

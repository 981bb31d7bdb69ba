"""Each sensitivity measure against a direct computation on small models."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.mixed import sensitivity as S


def _mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4)).eval()


def _x(n=16, seed=1):
    return torch.randn(n, 6, generator=torch.Generator().manual_seed(seed))


def test_row_errors_are_each_outputs_mean_squared_error():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(50, 7, generator=g)
    E = torch.randn(3, 7, generator=g) * 0.1
    direct = (E @ X.t()).pow(2).mean(1).double()
    assert torch.allclose(S.row_errors(E, X.t() @ X / 50), direct, rtol=1e-6)
    # a grouped convolution: output channels of group k see only group k's inputs
    H = torch.stack([X[:, :4].t() @ X[:, :4], X[:, 3:].t() @ X[:, 3:]]) / 50
    E2 = torch.randn(4, 4, generator=g)
    got = S.row_errors(E2, H)
    want = torch.cat([(E2[:2] @ X[:, :4].t()).pow(2).mean(1), (E2[2:] @ X[:, 3:].t()).pow(2).mean(1)]).double()
    assert torch.allclose(got, want, rtol=1e-6)


def test_output_fisher_is_the_mean_squared_loss_gradient_at_each_output():
    model, x = _mlp(), _x()
    got = S.output_fisher(model, ["0", "2"], [x[:8], x[8:]], seed=3, progress=False)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())  # left as it was
    gen = torch.Generator().manual_seed(3)
    want = {"0": torch.zeros(5, dtype=torch.float64), "2": torch.zeros(4, dtype=torch.float64)}
    for b in (x[:8], x[8:]):
        h = model[0](b)
        h.retain_grad()
        logits = model[2](model[1](h))
        logits.retain_grad()
        y = S.sampled_labels(logits, gen)
        F.cross_entropy(logits, y, reduction="sum").backward()
        want["0"] += h.grad.double().pow(2).sum(0)
        want["2"] += logits.grad.double().pow(2).sum(0)
    for n in want:
        assert torch.allclose(got[n], want[n] / 16, rtol=1e-5)


def test_hutchinson_estimates_the_mean_hessian_trace():
    model, x = _mlp(), _x(8)
    got = S.hutchinson_traces(model, ["0", "2"], [x], samples=400, seed=5, progress=False)
    gen = torch.Generator().manual_seed(5)
    y = S.sampled_labels(model(x), gen)  # the labels the estimator drew first from the same seed
    for name, idx in (("0", 0), ("2", 2)):
        W = model[idx].weight.detach().clone()

        def loss(w, idx=idx):
            layers = [model[0], model[1], model[2]]
            h = x
            for i, m in enumerate(layers):
                h = F.linear(h, w, m.bias) if i == idx else m(h)
            return F.cross_entropy(h, y)

        H = torch.autograd.functional.hessian(loss, W).reshape(W.numel(), W.numel())
        exact = float(torch.diagonal(H).sum()) / W.numel()
        assert got[name] == pytest.approx(exact, rel=0.15), name


def test_output_kl_is_zero_unchanged_and_grows_with_the_perturbation():
    model, x = _mlp(), _x()
    with torch.inference_mode():
        ref = [model(x)]
    assert S.output_kl(model, [x], ref) == pytest.approx(0.0, abs=1e-12)
    kls = []
    for eps in (0.01, 0.1):
        m = _mlp()
        m[2].weight.data += eps * torch.randn(4, 5, generator=torch.Generator().manual_seed(0))
        kls.append(S.output_kl(m, [x], ref))
    assert 0 < kls[0] < kls[1]

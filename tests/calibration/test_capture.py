"""Calibration capture: batching, calling the model on each batch kind, input statistics by hand."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.calibration import Request, batches, collect_input_stats, run_model
from lowbit.calibration.capture import BATCH_SIZE, BATCH_TOKENS, batch_count, tensor_batch_size
from lowbit.errors import InputError
from lowbit.spec import ActivationQuant


class TwoInputs(nn.Module):
    """``fc(a) + gate(b)``; ``unused`` never runs."""

    def __init__(self) -> None:
        super().__init__()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self.fc = nn.Linear(4, 3)
            self.gate = nn.Linear(4, 3)
            self.unused = nn.Linear(4, 3)
            self.conv = nn.Conv2d(2, 2, 1)

    def forward(self, a: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc(a)
        return y if b is None else y + self.gate(b)


def test_batches_split_a_tensor_along_its_first_dim():
    x = torch.arange(28.0).reshape(7, 4)
    parts = list(batches(x, batch_size=3))
    assert [p.shape[0] for p in parts] == [3, 3, 1]
    assert torch.equal(torch.cat(parts), x)
    assert list(batches(None)) == []


def test_token_ids_are_batched_by_tokens_and_other_tensors_by_rows():
    ids = torch.zeros(128, 512, dtype=torch.long)
    assert tensor_batch_size(ids) == BATCH_TOKENS // 512
    parts = list(batches(ids))
    assert len(parts) == batch_count(ids) == 128 * 512 // BATCH_TOKENS
    assert all(p.shape == (BATCH_TOKENS // 512, 512) for p in parts)
    long_rows = torch.zeros(3, 4 * BATCH_TOKENS, dtype=torch.long)
    assert [p.shape[0] for p in batches(long_rows)] == [1, 1, 1]  # never less than one whole sequence
    images = torch.zeros(20, 3, 8, 8)
    assert [p.shape[0] for p in batches(images)] == [BATCH_SIZE, BATCH_SIZE, 20 - 2 * BATCH_SIZE]
    features = torch.zeros(20, 512)  # float rows are features, not token ids
    assert batch_count(features) == -(-20 // BATCH_SIZE)
    assert batch_count(ids, batch_size=64) == 2


def test_batches_pass_other_iterables_through():
    d = {"a": torch.ones(2, 4)}
    assert list(batches(d)) == [d]  # a mapping is one batch, not its keys
    items = [torch.ones(1, 4), (torch.ones(1, 4), torch.zeros(1, 4))]
    assert list(batches(items)) == items
    gen = (torch.ones(1, 4) for _ in range(3))
    assert len(list(batches(gen))) == 3


def test_run_model_dispatches_on_the_batch_kind():
    calls = []

    class Spy(nn.Module):
        def forward(self, a, b=None):
            calls.append((a, b))
            return a

    m, a, b = Spy(), torch.ones(1), torch.zeros(1)
    run_model(m, a)
    run_model(m, (a, b))
    run_model(m, [a, b])
    run_model(m, {"a": a, "b": b})
    run_model(m, {"a": a})
    assert [(x is a, y is b if y is not None else None) for x, y in calls] == [
        (True, None), (True, True), (True, True), (True, True), (True, None)]


def _data(gen, n_batches: int = 3):
    """Batches of different sizes and ranks: (2, 5, 4), (3, 4), (1, 2, 2, 4)."""
    shapes = [(2, 5, 4), (3, 4), (1, 2, 2, 4)][:n_batches]
    return [torch.randn(s, generator=gen) * (i + 1) for i, s in enumerate(shapes)]


def test_importance_is_mean_square_per_feature(gen):
    model = TwoInputs().eval()
    data = _data(gen)
    stats = collect_input_stats(model, {"fc": Request(model.fc, None, True)}, data, progress=False)
    rows = torch.cat([x.reshape(-1, 4) for x in data])  # (10 + 3 + 4, 4)
    s = stats["fc"]
    assert s.n_rows == 17
    assert s.importance.shape == (4,) and s.importance.dtype == torch.float32
    assert torch.allclose(s.importance, (rows**2).mean(0), rtol=1e-6)
    assert s.act_range is None


def test_dict_and_tuple_batches_reach_the_right_modules(gen):
    model = TwoInputs().eval()
    a, b = torch.randn(6, 4, generator=gen), torch.randn(6, 4, generator=gen) * 3
    wanted = {"fc": Request(model.fc, None, True), "gate": Request(model.gate, None, True)}
    for data in ([(a, b)], [{"a": a, "b": b}]):
        stats = collect_input_stats(model, wanted, data, progress=False)
        assert torch.allclose(stats["fc"].importance, (a**2).mean(0))
        assert torch.allclose(stats["gate"].importance, (b**2).mean(0))
        assert stats["fc"].n_rows == stats["gate"].n_rows == 6


def test_static_activation_range_is_observed(gen):
    model = TwoInputs().eval()
    data = _data(gen)
    act = ActivationQuant("int8-tensor", dynamic=False)
    stats = collect_input_stats(model, {"fc": Request(model.fc, act, False)}, data, progress=False)
    s = stats["fc"]
    lo, hi = s.act_range
    assert lo.shape == hi.shape == (1, 1)
    allx = torch.cat([x.reshape(-1) for x in data])
    assert torch.allclose(lo, allx.min().reshape(1, 1)) and torch.allclose(hi, allx.max().reshape(1, 1))
    assert s.importance is None


def test_convolution_rows_count_images(gen):
    act = ActivationQuant("int8-tensor", dynamic=False)
    model = nn.Sequential(nn.Conv2d(2, 3, 1))
    stats = collect_input_stats(model, {"0": Request(model[0], act)},
                                [torch.randn(2, 2, 4, 4, generator=gen), torch.randn(3, 2, 4, 4, generator=gen)],
                                progress=False)
    assert stats["0"].n_rows == 5
    model = nn.Sequential(nn.Conv1d(2, 3, 1))
    stats = collect_input_stats(model, {"0": Request(model[0], act)}, [torch.randn(3, 2, 7, generator=gen)],
                                progress=False)
    assert stats["0"].n_rows == 3


def test_module_never_run_is_an_error(gen):
    model = TwoInputs().eval()
    wanted = {"fc": Request(model.fc, None, True), "unused": Request(model.unused, None, True)}
    with pytest.raises(InputError, match="unused never ran"):
        collect_input_stats(model, wanted, _data(gen), progress=False)
    assert not model.fc._forward_pre_hooks and not model.unused._forward_pre_hooks, "hooks must be removed"


def test_empty_data_is_an_error():
    model = TwoInputs().eval()
    for empty in ([], iter(()), None, torch.zeros(0, 4)):
        with pytest.raises(InputError, match="empty"):
            collect_input_stats(model, {"fc": Request(model.fc, None, True)}, empty, progress=False)


def test_hooks_are_removed_when_the_model_fails(gen):
    model = TwoInputs().eval()
    with pytest.raises(InputError, match=r"TwoInputs failed on the first calibration batch, tensor \(2, 5\) float32"):
        collect_input_stats(model, {"fc": Request(model.fc, None, True)}, [torch.randn(2, 5, generator=gen)], progress=False)
    assert not model.fc._forward_pre_hooks


def test_mean_per_input_channel_for_linear_and_conv(gen):
    lin = nn.Linear(4, 3)
    conv = nn.Conv2d(4, 2, 3, padding=1)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.conv = lin, conv

        def forward(self, x):  # x: (N, 4, H, W)
            return self.conv(x).sum() + self.lin(x.permute(0, 2, 3, 1)).sum()

    data = [torch.randn(2, 4, 5, 6, generator=gen) + torch.arange(4.0)[:, None, None] for _ in range(3)]
    stats = collect_input_stats(Two(), {"lin": Request(lin, mean=True), "conv": Request(conv, mean=True)}, data,
                                progress=False)
    expected = torch.cat(data).mean(dim=(0, 2, 3))  # (4,) per channel
    assert torch.allclose(stats["conv"].mean, expected, atol=1e-6)
    assert torch.allclose(stats["lin"].mean, expected, atol=1e-6)
    assert stats["conv"].importance is None and stats["conv"].n_rows == 6


@pytest.mark.parametrize("d", [5, 384, 577, 1536])
def test_gram_equals_the_full_product(d):
    from lowbit.calibration.capture import gram

    x = torch.randn(300, d, generator=torch.Generator().manual_seed(d))
    assert torch.allclose(gram(x), x.t() @ x, rtol=1e-5, atol=1e-3)
    assert torch.allclose(gram(x), gram(x).t(), rtol=1e-5, atol=1e-3)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 products of the bf16-rounded input, in float32
        g = gram(x)
        want = (x.bfloat16().t() @ x.bfloat16()).float()
    assert g.dtype == torch.float32
    assert torch.allclose(g, want, rtol=1e-2, atol=1e-1) and torch.allclose(g, g.t(), rtol=1e-2, atol=1e-1)


def test_modules_fed_the_same_tensor_share_one_x_t_x(monkeypatch):
    """A Llama layer's q/k/v take one tensor, its gate/up another: X^T X is computed once for each, and every
    module gets the same statistics as alone."""
    from lowbit.calibration import capture
    from lowbit.models.tiny import tiny_llama

    model = tiny_llama()
    layer = model.model.layers[0]
    names = {f"model.layers.0.{n}": m for n, m in layer.named_modules()
             if isinstance(m, nn.Linear)}
    calls = []
    real = capture.gram
    monkeypatch.setattr(capture, "gram", lambda x, *a: calls.append(x.shape) or real(x, *a))
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    shared = collect_input_stats(model, {n: Request(m, hessian=True) for n, m in names.items()}, [ids],
                                 progress=False)
    assert len(calls) == 4  # q/k/v, o, gate/up, down
    for n, m in names.items():
        alone = collect_input_stats(model, {n: Request(m, hessian=True)}, [ids], progress=False)
        assert torch.equal(alone[n].hessian, shared[n].hessian), n

"""Block discovery and the block-sequential runner on tiny random causal LMs of four architectures."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.calibration import Request, collect_input_stats
from lowbit.calibration.blocks import find_blocks
from lowbit.calibration.sequential import capture_block_inputs, run_block_sequential
from lowbit.errors import InputError
from lowbit.models import tiny
from lowbit.nn.convert import is_linear_like

BUILDERS = {
    "llama": (tiny.tiny_llama, "model.layers"),
    "gpt2": (tiny.tiny_gpt2, "transformer.h"),
    "opt": (tiny.tiny_opt, "model.decoder.layers"),
    "gemma3": (tiny.tiny_gemma3, "model.layers"),
}


def _data(n: int = 6, seq: int = 40, seed: int = 0) -> torch.Tensor:
    # 40 tokens: longer than tiny Gemma-3's 16-token sliding window, so its layers really differ
    return torch.randint(3, 256, (n, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", BUILDERS)
def test_find_blocks_finds_the_decoder_layers(arch):
    build, prefix = BUILDERS[arch]
    model = build()
    blocks = find_blocks(model)
    n = model.config.num_hidden_layers
    assert [name for name, _ in blocks] == [f"{prefix}.{i}" for i in range(n)]
    assert all(model.get_submodule(name) is b for name, b in blocks)


def test_find_blocks_is_empty_without_repeated_blocks():
    assert find_blocks(tiny.tiny_cnn()) == []
    assert find_blocks(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU())) == []


@pytest.mark.parametrize("arch", BUILDERS)
def test_block_sequential_statistics_equal_whole_model_capture(arch):
    """With nothing quantized, observing block by block must see exactly what one model pass sees."""
    model = BUILDERS[arch][0]()
    blocks = find_blocks(model)
    data = _data()
    requests = {n: Request(m, hessian=True, abs_mean=True, importance=True) for n, m in model.named_modules()
                if is_linear_like(m) and any(n.startswith(b + ".") for b, _ in blocks)}
    whole = collect_input_stats(model, requests, data, progress=False)
    wanted = [{n: r for n, r in requests.items() if n.startswith(b + ".")} for b, _ in blocks]
    seen: dict = {}
    calls = []

    def solve(i, name, stats):
        calls.append(name)
        seen.update(stats)

    run_block_sequential(model, blocks, wanted, data, solve, progress=False)
    assert calls == [b for b, _ in blocks]
    assert set(seen) == set(whole)
    for n in whole:
        assert seen[n].n_rows == whole[n].n_rows == data.numel()
        for field in ("hessian", "abs_mean", "importance"):
            a, b = getattr(seen[n], field), getattr(whole[n], field)
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), f"{arch} {n} {field}"


def test_each_block_keeps_its_own_call_arguments():
    """Gemma-3's sliding and global layers get different masks and rotary tables from the model."""
    model = tiny.tiny_gemma3()
    blocks = find_blocks(model)
    inputs = capture_block_inputs(model, blocks, _data(4), progress=False)
    assert len(inputs.hidden) == 1 and inputs.hidden[0].shape == (4, 40, tiny.HIDDEN)
    kw = [inputs.calls[i][0][1] for i in range(3)]
    assert kw[0]["position_embeddings"] is kw[1]["position_embeddings"]
    assert kw[0]["position_embeddings"] is not kw[2]["position_embeddings"]
    # the recorders put every real block back
    assert [model.get_submodule(n) for n, _ in blocks] == [b for _, b in blocks]


def test_quantized_outputs_feed_the_next_block():
    """What block 1 observes depends on how block 0 was quantized."""
    model = tiny.tiny_llama()
    blocks = find_blocks(model)
    data = _data()
    req = {"model.layers.1.self_attn.q_proj": Request(model.get_submodule("model.layers.1.self_attn.q_proj"),
                                                      hessian=True)}
    float_h = collect_input_stats(model, req, data, progress=False)["model.layers.1.self_attn.q_proj"].hessian
    seen = {}

    def solve(i, name, stats):
        seen.update(stats)
        if i == 0:  # "quantize" block 0 crudely: zero its MLP output projection
            model.get_submodule(name).mlp.down_proj.weight.data.zero_()

    run_block_sequential(model, blocks, [{}, req], data, solve, progress=False)
    h = seen["model.layers.1.self_attn.q_proj"].hessian
    assert not torch.allclose(h, float_h, rtol=1e-3)


def test_empty_calibration_set_is_rejected():
    model = tiny.tiny_llama()
    with pytest.raises(InputError, match="empty"):
        capture_block_inputs(model, find_blocks(model), torch.zeros(0, 8, dtype=torch.long), progress=False)


class _Block(nn.Module):
    def __init__(self, twice: bool) -> None:
        super().__init__()
        self.up, self.down, self.twice = nn.Linear(8, 16), nn.Linear(16, 8), twice

    def forward(self, x):
        h = torch.relu(self.up(x))
        if self.twice:  # the same layer twice in one call: early stop must not cut its second call
            h = h + torch.relu(self.up(x * 0.5))
        return x + self.down(h)


class _Stack(nn.Module):
    def __init__(self, twice: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList(_Block(twice) for _ in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("twice", [False, True])
def test_observing_stops_early_only_when_that_loses_nothing(twice):
    model = _Stack(twice).eval()
    data = torch.randn(32, 5, 8, generator=torch.Generator().manual_seed(1))
    blocks = find_blocks(model)
    requests = {f"layers.{i}.up": Request(model.layers[i].up, hessian=True) for i in range(3)}
    whole = collect_input_stats(model, requests, data, progress=False)
    down_calls = []
    for _, b in blocks:
        b.down.register_forward_hook(lambda m, a, o: down_calls.append(1))
    seen = {}
    run_block_sequential(model, blocks, [{n: r} for n, r in requests.items()], data,
                         lambda i, name, stats: seen.update(stats), progress=False)
    for n in requests:
        assert seen[n].n_rows == whole[n].n_rows
        assert torch.allclose(seen[n].hessian, whole[n].hessian, rtol=1e-5, atol=1e-7)
    n_batches = 4  # 32 samples in batches of 8
    # capture runs block 0 once (to learn its output type); the observing pass runs `down` only where it must:
    # on the first batch (to learn the call pattern) when `up` runs once per call, on every batch when it runs
    # twice; the output pass runs it in blocks 0 and 1
    observing = (1 if not twice else n_batches) * 3
    assert len(down_calls) == 1 + observing + n_batches * 2

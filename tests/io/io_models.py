"""Small seeded models shared by the save/load tests (a helper module, imported by name)."""

from __future__ import annotations

import contextlib
import resource

import torch
from torch import nn

import lowbit
from lowbit.formats import quantize as quantize_tensor
from lowbit.nn.convert import float_weight, to_quantized
from lowbit.spec import ActivationQuant, QuantSpec


class TextNet(nn.Module):
    """Embedding -> Linear 96->80 (96 is not a multiple of 64) -> Linear 80->40: ids (B, T) -> (B, T, 40)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(40, 96)
        self.up = nn.Linear(96, 80)
        self.norm = nn.LayerNorm(80)
        self.down = nn.Linear(80, 40)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.norm(self.up(self.embed(ids)))))


class ConvNet(nn.Module):
    """Conv2d 8->16 -> BatchNorm -> Conv2d 16->16 -> pool 2x2 -> Linear 64->10: (N, 8, 8, 8) -> (N, 10)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, stride=2, padding=1, bias=False)
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.conv2(torch.relu(self.bn(self.conv1(x))))).flatten(1))


class TiedLM(nn.Module):
    """Embedding 64x64, a Linear 64->64, and a head whose weight is the embedding's (tied)."""

    def __init__(self, tie: bool = True) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 64)
        self.mid = nn.Linear(64, 64)
        self.head = nn.Linear(64, 64, bias=False)
        if tie:
            self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mid(self.emb(ids))))


def seeded(cls, *args, seed: int = 0, **kwargs) -> nn.Module:
    """``cls(*args)`` built under a fixed seed, in eval mode, without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        m = cls(*args, **kwargs)
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 2.0)
    return m.eval()


def quantized(cls, scheme: str, **plan_kwargs) -> nn.Module:
    """A seeded ``cls()`` with every supported layer quantized to ``scheme`` (no skips)."""
    model = seeded(cls)
    plan_kwargs.setdefault("skip", ())
    lowbit.quantize(model, lowbit.QuantPlan.uniform(scheme, **plan_kwargs), progress=False)
    return model


def with_static_act(model: nn.Module, name: str, scheme: str = "int8") -> nn.Module:
    """Replace the float linear ``name`` by a quantized one with static int8-tensor input quantization."""
    lin = model.get_submodule(name)
    act = ActivationQuant(QuantSpec.parse("int8-tensor"), dynamic=False)
    qm = to_quantized(lin, quantize_tensor(float_weight(lin), QuantSpec.parse(scheme)), act)
    qm.set_activation_range(torch.tensor(-1.5), torch.tensor(2.25))
    model.set_submodule(name, qm)
    return model


def text_input() -> torch.Tensor:
    return torch.randint(0, 40, (3, 7), generator=torch.Generator().manual_seed(1))


def conv_input() -> torch.Tensor:
    return torch.randn(2, 8, 8, 8, generator=torch.Generator().manual_seed(1))



@contextlib.contextmanager
def memory_bound(extra: int):
    """Cap this process's address space at what it maps now plus ``extra`` bytes (restored afterwards), so an
    allocation beyond that fails (MemoryError / RuntimeError) instead of succeeding or swapping."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    with open("/proc/self/statm") as f:
        mapped = int(f.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (mapped + extra, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))

"""Fashion-MNIST classifiers that lowbit trains itself, so quantized vision models have a true accuracy.

Two architectures, each the small version of a family lowbit must handle:

* ``fmnist-resnet``: a ResNet (He et al. 2016) with BatchNorm, ReLU and residual adds: a 3x3 stem (16
  channels) and three basic blocks (16, 32 and 64 channels, the last two with stride 2 and a 1x1 projection
  shortcut), global average pooling and a linear classifier. 0.08M parameters.
* ``fmnist-vit``: a vision transformer (Dosovitskiy et al. 2021) on 7x7 patches (16 tokens and a class token),
  width 64, 4 pre-norm blocks of 4-head attention and a GELU MLP (width 128), LayerNorm, a linear head on the
  class token. 0.14M parameters.

Input: ``lowbit.data.fashion_mnist.to_inputs`` images, ``(N, 1, 28, 28)`` float; output ``(N, 10)`` logits.

:func:`trained` trains one on the 60,000 training images on first use (seeded, two threads, a few minutes
of CPU; progress shows epochs and loss) and keeps its weights and measured test accuracy in the cache folder
(``$LOWBIT_CACHE/fmnist/NAME-vVERSION.safetensors``, written atomically); later calls read that file. Each
recipe carries a version that changes with it, and the file name with that, so a stale file is never reused.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.atomic import atomic_file
from lowbit.errors import InputError
from lowbit.paths import cache_dir

log = logging.getLogger(__name__)



class BasicBlock(nn.Module):
    """``relu(bn2(conv2(relu(bn1(conv1(x))))) + shortcut(x))``; shortcut: identity, or 1x1 conv + BN."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        self.relu2 = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + self.shortcut(x))


class FmnistResNet(nn.Module):
    def __init__(self, widths: tuple[int, ...] = (16, 32, 64), classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(BasicBlock(cin, w, 1 if i == 0 else 2))
            cin = w
        self.blocks = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 28, 28) -> (N, classes)
        return self.fc(torch.flatten(self.pool(self.blocks(self.stem(x))), 1))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.softmax = nn.Softmax(dim=-1)  # a module, so that a plan's inputs can quantize the scores
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, T, dim)
        n, t, d = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = self.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads))  # (N, heads, T, T)
        return self.proj((att @ v).transpose(1, 2).reshape(n, t, d))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, hidden: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class FmnistViT(nn.Module):
    def __init__(self, dim: int = 64, depth: int = 4, heads: int = 4, hidden: int = 128, patch: int = 7,
                 classes: int = 10) -> None:
        super().__init__()
        tokens = (28 // patch) ** 2
        self.patch_embed = nn.Conv2d(1, dim, patch, patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, hidden) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, 1, 28, 28) -> (N, classes)
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (N, 16, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.head(self.norm(x)[:, 0])


@dataclass(frozen=True)
class Recipe:
    """How a model is trained: epochs over the training split, batch size, AdamW's peak learning rate (one
    linear warm-up epoch, then cosine decay to 0), weight decay, and augmentation (random horizontal flips;
    ``shift``: random translations of up to that many pixels); ``version``: raised whenever any of it changes."""

    build: Callable[[], nn.Module]
    epochs: int
    lr: float
    version: int
    batch: int = 256
    weight_decay: float = 5e-4
    shift: int = 2


RECIPES: dict[str, Recipe] = {
    "fmnist-resnet": Recipe(FmnistResNet, epochs=3, lr=4e-3, version=1),
    "fmnist-vit": Recipe(FmnistViT, epochs=10, lr=2e-3, version=2, weight_decay=0.05),
}


def skeleton(name: str) -> nn.Module:
    """The architecture of ``name`` with its initial (seed 0) weights, eval mode; no training, no file read."""
    if name not in RECIPES:
        raise InputError(f"unknown Fashion-MNIST model {name!r}; known: {', '.join(RECIPES)}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return RECIPES[name].build().float().eval()


def weights_path(name: str) -> Path:
    return cache_dir() / "fmnist" / f"{name}-v{RECIPES[name].version}.safetensors"


def trained(name: str) -> tuple[nn.Module, float]:
    """``(model, test accuracy)``: the trained ``name`` from the cache, trained and cached first if absent."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file, save_file

    path = weights_path(name)
    model = skeleton(name)
    if path.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                accuracy = float(f.metadata()["test_accuracy"])
            model.load_state_dict(load_file(str(path)), strict=True)
            return model, accuracy
        except (SafetensorError, OSError, KeyError, ValueError, RuntimeError) as e:
            log.warning("%s: unreadable (%s); training %s again", path, e, name)
    log.info("training %s on Fashion-MNIST once (a few minutes); cached at %s", name, path)
    start = time.perf_counter()
    model, accuracy = train(name)
    seconds = time.perf_counter() - start
    log.info("%s: test accuracy %.2f%% after %.0f s of training", name, 100 * accuracy, seconds)
    with atomic_file(path) as tmp:
        meta = {"test_accuracy": repr(accuracy), "seconds": f"{seconds:.1f}", "version": str(RECIPES[name].version)}
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    return model, accuracy


def train(name: str, *, subset: int | None = None, epochs: int | None = None, progress: bool = True,
          threads: int = 2, test_limit: int | None = None) -> tuple[nn.Module, float]:
    """Train ``name`` by its recipe (seed 0, ``threads`` threads) and measure its test accuracy.

    ``subset`` (the first N training images), ``epochs`` and ``test_limit`` (the first N test images) shorten
    it for tests. Deterministic for a given torch build and thread count. Returns the model in eval mode and
    its top-1 accuracy on the 10,000 test images (or the first ``test_limit``).
    """
    from lowbit.data.fashion_mnist import fashion_mnist, to_inputs

    recipe = RECIPES[name]
    images, labels = fashion_mnist("train")
    if subset is not None:
        images, labels = images[:subset], labels[:subset]
    epochs = recipe.epochs if epochs is None else epochs
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = recipe.build().float().train()
            channels_last = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # faster CNN training
            if channels_last:
                model = model.to(memory_format=torch.channels_last)
            opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
            steps = epochs * math.ceil(images.shape[0] / recipe.batch)
            warmup = steps // max(epochs, 1)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / warmup if s < warmup else
                                                      0.5 * (1 + math.cos(math.pi * (s - warmup) / max(steps - warmup, 1))))
            bar = tqdm(total=steps, desc=f"train {name}", unit="step", disable=not progress, leave=False)
            for epoch in range(epochs):
                order = torch.randperm(images.shape[0])
                for i in range(0, images.shape[0], recipe.batch):
                    idx = order[i:i + recipe.batch]
                    x = _augment(to_inputs(images[idx]), recipe.shift)
                    if channels_last:
                        x = x.contiguous(memory_format=torch.channels_last)
                    loss = F.cross_entropy(model(x), labels[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    sched.step()
                    bar.update(1)
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
            bar.close()
        model = model.to(memory_format=torch.contiguous_format).eval()
        return model, test_accuracy(model, progress=progress, limit=test_limit)
    finally:
        torch.set_num_threads(old_threads)


def test_accuracy(model: nn.Module, batch: int = 500, progress: bool = False, limit: int | None = None) -> float:
    """Top-1 accuracy of ``model`` on the Fashion-MNIST test split (the first ``limit`` images, default all)."""
    from lowbit.data.fashion_mnist import fashion_mnist, to_inputs

    images, labels = fashion_mnist("test")
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    correct = 0
    with torch.inference_mode():
        for i in tqdm(range(0, images.shape[0], batch), desc="accuracy", disable=not progress, leave=False):
            correct += int((model(to_inputs(images[i:i + batch])).argmax(-1) == labels[i:i + batch]).sum())
    return correct / images.shape[0]


def _augment(x: torch.Tensor, shift: int) -> torch.Tensor:
    """Random horizontal flips and translations of up to ``shift`` pixels (zero-padded in input space)."""
    flip = torch.rand(x.shape[0]) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    if shift:
        from lowbit.data.fashion_mnist import MEAN, STD

        pad = F.pad(x, (shift,) * 4, value=-MEAN / STD)  # a black pixel
        dx, dy = torch.randint(0, 2 * shift + 1, (2,)).tolist()
        x = pad[:, :, dy:dy + 28, dx:dx + 28]
    return x

"""Speed measurements: one matrix product per format and shape, LM prefill and decode, classifier throughput.

Every function times real work on this machine and returns seconds (or a rate); the callers
(``lowbit bench``, ``benchmarks/speed.py``) always measure the float baseline in the same run and print
ratios. Timing: a warm-up call, then repeated calls until ``min_time`` has passed (at least ``min_reps``),
reporting the median, which is robust to the odd slow call from another process.

Formats of a matrix-product row (``MATMUL_FORMATS``):

    fp32        nn.Linear in float32 (the baseline)
    bf16        nn.Linear in bfloat16
    int4-g128   4-bit asymmetric weights in groups of 128, the dispatch's weight-only kernel (lowbit's float32
                C++ kernel where it builds, else torch's int4 matmul with bf16 activations)
    int8        8-bit per-channel symmetric weights, the dispatch's weight-only kernel (likewise)
    w8a8        8-bit per-channel weights x dynamic per-token 8-bit activations, int8 x int8 kernel
    w4a8        4-bit asymmetric weights in groups of 128 x dynamic per-token 8-bit activations, int8 x int8
                products per group (lowbit.kernels.w4a8)
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import InputError

MATMUL_FORMATS: dict[str, tuple[str | None, str | None]] = {  # name -> (weight spec, dynamic activation spec)
    "fp32": (None, None),
    "bf16": (None, None),
    "int4-g128": ("int4-g128-asym", None),
    "int8": ("int8", None),
    "w8a8": ("int8", "int8-token"),
    "w4a8": ("int4-g128-asym", "int8-token"),
}
LLM_SHAPES = ((576, 1536), (2048, 2048), (4096, 4096), (4096, 11008))  # (in_features, out_features)
BATCHES = (1, 16, 128)


def median_time(fn: Callable[[], Any], min_time: float = 0.3, min_reps: int = 3, max_reps: int = 200) -> float:
    """Median seconds of ``fn()`` after one warm-up call."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_reps or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_layer(fmt: str, in_features: int, out_features: int, seed: int = 0) -> tuple[nn.Module, torch.dtype, str]:
    """A linear layer of ``fmt`` with random weights: (layer, input dtype, what runs it)."""
    from lowbit.formats import quantize as quantize_tensor
    from lowbit.kernels import kernel_name, use_kernels
    from lowbit.nn import QuantLinear
    from lowbit.spec import ActivationQuant, QuantSpec

    if fmt not in MATMUL_FORMATS:
        raise InputError(f"unknown matmul format {fmt!r}; known: {', '.join(MATMUL_FORMATS)}")
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_features, in_features, generator=g) / in_features**0.5
    if fmt in ("fp32", "bf16"):
        dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
        lin = nn.Linear(in_features, out_features, bias=False, dtype=dtype).requires_grad_(False)
        with torch.no_grad():
            lin.weight.copy_(w)
        return lin, dtype, f"torch {fmt} linear"
    wspec, aspec = MATMUL_FORMATS[fmt]
    act = None if aspec is None else ActivationQuant(QuantSpec.parse(aspec), dynamic=True)
    m = QuantLinear.from_float(w, None, quantize_tensor(w, QuantSpec.parse(wspec)), act)
    use_kernels(m, keep_reference=False)
    name = kernel_name(m)
    if name is None:
        raise InputError(f"no kernel runs {fmt} at {in_features}x{out_features}")
    # a model's activations are float32; torch's weight-only kernels compute in bf16, and are given bf16 here
    return m, (torch.bfloat16 if name.endswith("-bf16") else torch.float32), name


@dataclass(frozen=True)
class MatmulRow:
    in_features: int
    out_features: int
    batch: int
    seconds: dict[str, float]  # format -> median seconds of one product

    def speedup(self, fmt: str, base: str = "fp32") -> float:
        return self.seconds[base] / self.seconds[fmt]


def matmul_times(in_features: int, out_features: int, batches: tuple[int, ...] = BATCHES,
                 formats: tuple[str, ...] = tuple(MATMUL_FORMATS), min_time: float = 0.3,
                 rounds: int = 3) -> list[MatmulRow]:
    """Median seconds of ``y = x @ W.T`` for each batch and format.

    Every format's layer is built first; then, per batch, ``rounds`` rounds each time every format in turn
    (``min_time / rounds`` each), so a slow spell of the machine lands on all formats alike, and each format's
    time is the median of its round medians.
    """
    layers = {fmt: matmul_layer(fmt, in_features, out_features)[:2] for fmt in formats}
    times: dict[int, dict[str, float]] = {}
    for b in batches:
        x = torch.randn(b, in_features, generator=torch.Generator().manual_seed(b))
        inputs = {fmt: x.to(dtype) for fmt, (_, dtype) in layers.items()}
        rounds_of: dict[str, list[float]] = {fmt: [] for fmt in formats}
        with torch.inference_mode():
            for _ in range(max(1, rounds)):
                for fmt, (layer, _) in layers.items():
                    rounds_of[fmt].append(median_time(lambda: layer(inputs[fmt]), min_time=min_time / max(1, rounds)))
        times[b] = {fmt: statistics.median(ts) for fmt, ts in rounds_of.items()}
    return [MatmulRow(in_features, out_features, b, times[b]) for b in batches]


@dataclass(frozen=True)
class DecodeResult:
    prompt_tokens: int
    new_tokens: int
    prefill_seconds: float  # one forward pass over the prompt, filling the KV cache
    decode_tokens_per_s: float  # greedy, batch 1, one token per step, after the prompt

    @property
    def decode_ms_per_token(self) -> float:
        return 1000.0 / self.decode_tokens_per_s


def decode_speed(model: nn.Module, prompt: torch.Tensor, new_tokens: int = 128, repeats: int = 2) -> DecodeResult:
    """Prefill time and greedy decode tokens/s of a Hugging Face causal LM, batch 1, through ``generate``.

    ``prompt``: int64 ``(1, T)``. Decode rate = ``(new_tokens - 1) / (t(generate new_tokens) -
    t(generate 1))``, so prompt processing and ``generate``'s set-up cancel; best of ``repeats``.
    """
    if prompt.dim() != 2 or prompt.shape[0] != 1 or prompt.shape[1] < 1:
        raise InputError(f"prompt must be token ids of shape (1, T) with T >= 1, got {tuple(prompt.shape)}")
    if new_tokens < 2:
        raise InputError(f"new_tokens must be at least 2, got {new_tokens}")
    attention = torch.ones_like(prompt)

    def generate(n: int) -> float:
        t0 = time.perf_counter()
        out = model.generate(prompt, attention_mask=attention, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             pad_token_id=0)
        dt = time.perf_counter() - t0
        if out.shape[1] != prompt.shape[1] + n:
            raise RuntimeError(f"generate returned {out.shape[1] - prompt.shape[1]} tokens, asked for {n}")
        return dt

    with torch.inference_mode():
        model(prompt)  # warm-up: first-call allocations and kernel selection
        prefill = median_time(lambda: model(prompt, use_cache=True), min_time=0.5)
        generate(4)
        rate = 0.0
        for _ in range(repeats):
            rate = max(rate, (new_tokens - 1) / max(generate(new_tokens) - generate(1), 1e-9))
    return DecodeResult(int(prompt.shape[1]), new_tokens, prefill, rate)


def images_per_second(model: nn.Module, batch: int = 8, size: int = 224, min_time: float = 1.0) -> float:
    """Classifier throughput on random ``(batch, 3, size, size)`` float32 input."""
    x = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        return batch / median_time(lambda: model(x), min_time=min_time)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of ``model``'s state (tied tensors once, ``lowbit.evaluation.model_size``) plus the kernels' packed
    copies of the weights (after ``use_kernels(..., keep_reference=False)`` the only copies)."""
    from lowbit.nn.size import model_size
    from lowbit.nn.base import KERNEL_ATTR

    packed = sum(p.nbytes() for m in model.modules() if (p := m.__dict__.get(KERNEL_ATTR)) is not None)
    return model_size(model).total_bytes + packed

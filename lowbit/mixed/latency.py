"""How long each searched layer takes under each candidate format on this machine: the table a latency budget
(``lowbit search --budget 4ms``) allocates against.

Every candidate layer runs on the kernel lowbit's dispatch table gives it (``lowbit.kernels.use_kernels``; a
format no kernel takes runs the reference path, dequantize then multiply, and is timed as such) on a random input
of ``tokens`` rows (1: a decode step; more: a prompt). Layers of the same kind, shape and format are timed once.
The timings are interleaved: each round times every distinct layer once, so a machine slowed for a while slows all
of them alike, and the median over the rounds is kept. They depend on the machine, its load and
``torch.get_num_threads()``; the record keeps the setting and the CPU.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.nn.base import QuantModule


def latency_table(layers: dict[tuple[str, str], QuantModule], tokens: int = 1, rounds: int = 15,
                  warmup: int = 3) -> dict[tuple[str, str], float]:
    """Seconds per call of every ``(layer, spec)`` quantized module on ``tokens`` input rows (median of ``rounds``).

    Raises:
        InputError: a layer that is not a linear one (a convolution's time depends on its input size, which the
            module alone does not give), or ``tokens`` / ``rounds`` below 1.
    """
    from lowbit.kernels import release_kernels, use_kernels

    if tokens < 1 or rounds < 1:
        raise InputError(f"latency timing needs tokens >= 1 and rounds >= 1, got {tokens} and {rounds}")
    distinct: dict[tuple, QuantModule] = {}
    key_of: dict[tuple[str, str], tuple] = {}
    for (name, spec), m in layers.items():
        if m.weight_shape is None or len(m.weight_shape) != 2 or not hasattr(m, "in_features"):
            raise InputError(f"{name}: a latency budget times linear layers; {type(m).__name__} is not one "
                             f"(give a bits-per-weight or bytes budget)")
        key = (type(m).__name__, tuple(m.weight_shape), spec, getattr(m, "bias", None) is not None)
        key_of[(name, spec)] = key
        distinct.setdefault(key, m)
    holder = nn.ModuleList(distinct.values())
    use_kernels(holder)
    try:
        inputs = {k: torch.randn(tokens, m.weight_shape[1]) for k, m in distinct.items()}
        times: dict[tuple, list[float]] = {k: [] for k in distinct}
        with torch.inference_mode():
            for r in range(warmup + rounds):
                for k, m in distinct.items():
                    t = time.perf_counter()
                    m(inputs[k])
                    if r >= warmup:
                        times[k].append(time.perf_counter() - t)
    finally:
        release_kernels(holder)
    median = {k: statistics.median(v) for k, v in times.items()}
    return {key: median[k] for key, k in key_of.items()}


def group_latency(groups: Sequence[Sequence[str]], specs: Sequence[str], table: dict[tuple[str, str], float]
                  ) -> list[list[float]]:
    """Per group and spec, the summed seconds of its layers."""
    return [[sum(table[(n, s)] for n in g) for s in specs] for g in groups]

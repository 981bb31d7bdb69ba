"""Collect statistics of the inputs of chosen modules while a model runs on calibration data.

``data`` is an iterable of batches; each batch is passed to the model as ``model(**b)`` for a mapping,
``model(*b)`` for a tuple/list and ``model(b)`` otherwise. A tensor is split along its first dimension
into batches of ``batch_size``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import InputError
from lowbit.observers import make_observer
from lowbit.spec import ActivationQuant

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Request:
    """What to observe at one module's input.

    Attributes:
        module: the module whose input is observed.
        act: static activation quantization whose range to calibrate, or None.
        importance: accumulate ``mean(x**2)`` per input feature (linears).
        mean: accumulate ``mean(x)`` per input channel (the feature dim of a linear, dim 1 of a conv).
        hessian: accumulate ``X^T X / n`` over input vectors (linears; GPTQ's ``H`` up to a factor 2).
    """

    module: nn.Module
    act: ActivationQuant | None = None
    importance: bool = False
    mean: bool = False
    hessian: bool = False


@dataclass(frozen=True)
class InputStats:
    """What was seen at one module's input.

    Attributes:
        act_range: ``(lo, hi)`` float32 ``(1, 1)`` each, from the activation observer, or None.
        importance: float32 ``(in_features,)`` mean of ``x**2`` per input feature (linears), or None.
        mean: float32 ``(in_channels,)`` mean of ``x`` per input channel, or None.
        n_rows: number of input rows (tokens, or images for convolutions) seen.
        hessian: float32 ``(in_features, in_features)`` ``X^T X / n_rows`` (linears), or None.
    """

    act_range: tuple[torch.Tensor, torch.Tensor] | None
    importance: torch.Tensor | None
    n_rows: int
    mean: torch.Tensor | None = None
    hessian: torch.Tensor | None = None


BATCH_SIZE = 8  # rows per batch when calibration data is one tensor


def batches(data: Any, batch_size: int = BATCH_SIZE) -> Iterator[Any]:
    """Iterate over calibration batches (see module docstring)."""
    if data is None:
        return iter(())
    if isinstance(data, torch.Tensor):  # an empty tensor is no batch (split would give one empty batch)
        return iter(data.split(batch_size)) if data.numel() else iter(())
    if isinstance(data, dict):
        return iter((data,))
    return iter(data)


def batch_count(data: Any, batch_size: int = BATCH_SIZE) -> int | None:
    """How many batches :func:`batches` yields, when that is known without iterating (for progress)."""
    if isinstance(data, torch.Tensor):
        return -(-data.shape[0] // batch_size)
    if isinstance(data, dict):
        return 1
    return len(data) if isinstance(data, (list, tuple)) else None


def run_model(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, dict):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def collect_input_stats(
    model: nn.Module,
    wanted: dict[str, Request],
    data: Iterable[Any],
    progress: bool = True,
) -> dict[str, InputStats]:
    """Run ``model`` on ``data`` once, observing the inputs of the modules in ``wanted``.

    Raises:
        InputError: ``data`` holds no batch, or a module never ran.
    """
    observers = {n: make_observer(r.act.observer, r.act.spec) for n, r in wanted.items()
                 if r.act is not None and not r.act.dynamic}
    sums: dict[tuple[str, str], torch.Tensor] = {}  # (name, "sumsq" | "sum") -> per-feature running sum
    rows: dict[str, int] = {n: 0 for n in wanted}
    mean_count: dict[str, int] = {n: 0 for n in wanted}

    def add(key: tuple[str, str], v: torch.Tensor) -> None:
        sums[key] = v if key not in sums else sums[key] + v

    def hook_for(name: str, req: Request):
        is_conv = isinstance(req.module, nn.modules.conv._ConvNd)

        def hook(mod: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            if x.numel() == 0:
                return
            if name in observers:
                observers[name].update(x.float())
            x2 = x.reshape(-1, x.shape[-1]).float()
            # a convolution's row is an image; anything else (a linear fed (B, H, W, C) too) has one per vector
            rows[name] += x.shape[0] if is_conv else x2.shape[0]
            if req.importance:
                add((name, "sumsq"), x2.pow(2).sum(0))
            if req.hessian:
                add((name, "xtx"), x2.t() @ x2)  # (in, in)
            if req.mean:
                xc = x.float().transpose(0, 1).reshape(x.shape[1], -1) if is_conv else x2.t()  # (channels, n)
                add((name, "sum"), xc.sum(1))
                mean_count[name] += xc.shape[1]
        return hook

    handles = [r.module.register_forward_pre_hook(hook_for(n, r)) for n, r in wanted.items()]
    n_batches = 0
    try:
        with torch.inference_mode():
            for b in tqdm(batches(data), total=batch_count(data), desc="calibrate", unit="batch",
                          disable=not progress, leave=False):
                run_model(model, b)
                n_batches += 1
    finally:
        for h in handles:
            h.remove()
    if n_batches == 0 or not any(rows.values()):
        raise InputError("the calibration data set is empty: it yielded no batch (or only empty ones)")
    silent = [n for n, r in rows.items() if r == 0]
    if silent:
        raise InputError(f"module(s) {', '.join(silent[:5])} never ran on the calibration data; "
                         "check that the data reaches them")
    out = {}
    for n in wanted:
        rng = None
        if n in observers:
            r = observers[n].compute()
            rng = (r.lo, r.hi)
        imp = sums[(n, "sumsq")] / rows[n] if (n, "sumsq") in sums else None
        mean = sums[(n, "sum")] / mean_count[n] if (n, "sum") in sums else None
        hess = sums[(n, "xtx")] / rows[n] if (n, "xtx") in sums else None
        out[n] = InputStats(rng, imp, rows[n], mean, hess)
    log.info("calibrated %d module(s) on %d batch(es)", len(out), n_batches)
    return out

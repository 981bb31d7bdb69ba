"""Collect statistics of the inputs of chosen modules while a model (or one block of it) runs on data.

``data`` is an iterable of batches; each batch is passed to the model as ``model(**b)`` for a mapping,
``model(*b)`` for a tuple/list and ``model(b)`` otherwise. A tensor is split along its first dimension:
a ``(n, seq_len)`` tensor of token ids into batches of about ``BATCH_TOKENS`` tokens (whole sequences), any
other tensor (images, features) into batches of ``BATCH_SIZE`` rows. The activations of one batch are what
a calibration pass holds on top of the model, so sizing batches by tokens keeps that bounded whatever the
sequence length (SmolLM2-135M, GPTQ, 128 x 512 tokens: batches of 8 sequences peaked about 100 MB higher
than batches of 4, at the same speed).

:class:`InputCollector` holds the forward pre-hooks and running sums; :func:`collect_input_stats` drives it
over a whole model, and the block-sequential runner (``lowbit.calibration.sequential``) over one block at
a time. Modules fed the same tensor in one call (a transformer's q/k/v projections) share its ``X^T X``:
it is computed once per batch, not once per module.
"""

from __future__ import annotations

import inspect
import logging
import math
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import InputError
from lowbit.nn.rotation import module_input
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
        hessian: accumulate ``X^T X / n`` over input vectors (GPTQ's ``H`` up to a factor 2): a linear's inputs,
            or the patches a convolution multiplies (``conv_patches``: each output position's receptive field,
            the weight's ``(in * kernel)`` columns, as GPTQ does for ResNets); for a grouped convolution one
            such matrix per group, ``(groups, in / groups * kernel, in / groups * kernel)``.
        abs_mean: accumulate ``mean(|x|)`` per input feature (AWQ's activation magnitude); for a convolution
            per input channel, repeated over its kernel positions (one per patch column).
        routed: the module sees only the tokens a router sends it (a mixture-of-experts expert): that no
            token reached it is a result (``InputStats.n_rows == 0``), not an error.
    """

    module: nn.Module
    act: ActivationQuant | None = None
    importance: bool = False
    mean: bool = False
    hessian: bool = False
    abs_mean: bool = False
    routed: bool = False


@dataclass(frozen=True)
class InputStats:
    """What was seen at one module's input.

    Attributes:
        act_range: ``(lo, hi)`` float32 ``(1, 1)`` each, from the activation observer, or None.
        importance: float32 ``(in_features,)`` mean of ``x**2`` per input feature (linears), or None.
        n_rows: number of input rows (tokens, or images for convolutions) seen; 0 only for a routed module
            (``Request.routed``) that no token reached, whose statistics are then all None.
        mean: float32 ``(in_channels,)`` mean of ``x`` per input channel, or None.
        hessian: float32 ``(in_features, in_features)`` ``X^T X / n_rows`` (linears; a convolution's patch
            columns; ``(groups, cols, cols)`` per group of a grouped convolution), or None.
        abs_mean: float32 ``(in_features,)`` mean of ``|x|`` per input feature (linears), or None.
    """

    act_range: tuple[torch.Tensor, torch.Tensor] | None
    importance: torch.Tensor | None
    n_rows: int
    mean: torch.Tensor | None = None
    hessian: torch.Tensor | None = None
    abs_mean: torch.Tensor | None = None


BATCH_SIZE = 8  # rows per batch when calibration data is one tensor of images or features
BATCH_TOKENS = 2048  # tokens per batch when it is a (n, seq_len) tensor of token ids


def tensor_batch_size(data: torch.Tensor) -> int:
    """Rows per batch for a calibration tensor: whole sequences making about ``BATCH_TOKENS`` tokens
    (at least one) for integer ``(n, seq_len)`` token ids, else ``BATCH_SIZE``."""
    if data.dim() == 2 and not data.is_floating_point() and not data.is_complex():
        return max(1, BATCH_TOKENS // max(1, data.shape[1]))
    return BATCH_SIZE


def batches(data: Any, batch_size: int | None = None) -> Iterator[Any]:
    """Iterate over calibration batches (see module docstring); ``batch_size`` overrides the rows per batch
    of a tensor."""
    if data is None:
        return iter(())
    if isinstance(data, torch.Tensor):  # an empty tensor is no batch (split would give one empty batch)
        return iter(data.split(batch_size or tensor_batch_size(data))) if data.numel() else iter(())
    if isinstance(data, dict):
        return iter((data,))
    return iter(data)


def batch_count(data: Any, batch_size: int | None = None) -> int | None:
    """How many batches :func:`batches` yields, when that is known without iterating (for progress)."""
    if isinstance(data, torch.Tensor):
        return -(-data.shape[0] // (batch_size or tensor_batch_size(data)))
    if isinstance(data, dict):
        return 1
    return len(data) if isinstance(data, (list, tuple)) else None


def run_model(model: nn.Module, batch: Any, check_fit: bool = True) -> Any:
    """Call ``model`` on one batch; Hugging Face models get ``use_cache=False`` (no key/value cache).

    ``check_fit``: pass True for the first batch (the default, for callers that do not count). The model's
    own error there (a RuntimeError, IndexError, ...) means the data does not fit the model (float images
    given to a language model, token ids beyond its vocabulary, the wrong width), so it becomes an
    InputError that describes the batch; on later batches errors pass through unchanged.
    """
    extra = {"use_cache": False} if _accepts_use_cache(model) else {}
    try:
        if isinstance(batch, dict):
            return model(**{**extra, **batch})
        if isinstance(batch, (tuple, list)):
            return model(*batch, **extra)
        return model(batch, **extra)
    except InputError:
        raise
    except (RuntimeError, IndexError, ValueError, TypeError, AttributeError) as e:
        if not check_fit:
            raise
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise InputError(f"{type(model).__name__} failed on the first calibration batch, {describe_batch(batch)}"
                         f"{_vocab_hint(model, batch)}: the data does not fit the model ({type(e).__name__}: "
                         f"{first}); pass token ids (batch, seq_len) for a language model, or inputs shaped like "
                         f"its training data (e.g. images (N, C, H, W) float32)") from e


def describe_batch(batch: Any) -> str:
    """A batch's structure for messages: ``tensor (4, 7) float32``, ``{input_ids: tensor (2, 9) int64}``."""
    if isinstance(batch, torch.Tensor):
        return f"tensor {tuple(batch.shape)} {str(batch.dtype).removeprefix('torch.')}"
    if isinstance(batch, dict):
        return "{" + ", ".join(f"{k}: {describe_batch(v)}" for k, v in list(batch.items())[:6]) + "}"
    if isinstance(batch, (tuple, list)):
        return "(" + ", ".join(describe_batch(v) for v in batch[:6]) + ")"
    return type(batch).__name__


def _vocab_hint(model: nn.Module, batch: Any) -> str:
    """For integer ids outside the model's input embedding: the range seen and the embedding's size."""
    ids = batch.get("input_ids") if isinstance(batch, dict) else batch
    get = getattr(model, "get_input_embeddings", None)
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.numel() == 0 or get is None:
        return ""
    try:
        rows = get().num_embeddings
    except (AttributeError, NotImplementedError):
        return ""
    lo, hi = int(ids.min()), int(ids.max())
    return f" (ids {lo}..{hi}, but the input embedding has {rows} rows)" if lo < 0 or hi >= rows else ""


class StopObserving(Exception):
    """Raised by an :class:`InputCollector` with ``early_stop`` once the batch has nothing left to show."""


class InputCollector:
    """Forward pre-hooks on the modules of ``wanted`` that accumulate their input statistics.

    Use as a context manager (hooks are removed on exit); call :meth:`new_batch` before each model or
    block call, and :meth:`result` once at the end.

    With ``early_stop``, a caller that needs no output from its calls lets the collector cut them short:
    if in the first batch every wanted module ran exactly once, later batches raise :class:`StopObserving`
    as soon as the last of them has been observed (a block's final projection and residual are not computed).
    """

    def __init__(self, wanted: dict[str, Request], early_stop: bool = False) -> None:
        self.wanted = wanted
        self.early_stop = early_stop
        self._order: list[str] = []  # modules observed in this batch, in call order
        self._stop_after: str | None = None
        self.observers = {n: make_observer(r.act.observer, r.act.spec, **dict(r.act.observer_settings))
                          for n, r in wanted.items()
                          if r.act is not None and not r.act.dynamic}
        self.sums: dict[tuple[str, str], torch.Tensor] = {}  # (name, stat) -> running sum
        self.rows = {n: 0 for n in wanted}
        self.mean_count = {n: 0 for n in wanted}
        self.n_batches = 0
        self._shared: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # this batch's X^T X per input tensor
        self._handles: list[Any] = []

    def __enter__(self) -> "InputCollector":
        self._handles = [r.module.register_forward_pre_hook(self._hook_for(n, r)) for n, r in self.wanted.items()]
        return self

    def __exit__(self, *exc: Any) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._shared.clear()

    def new_batch(self) -> None:
        if self.early_stop and self.n_batches == 1 and sorted(self._order) == sorted(self.wanted):
            self._stop_after = self._order[-1]  # the first batch showed each module running once
        self._shared.clear()
        self._order = []
        self.n_batches += 1

    def _add(self, key: tuple[str, str], v: torch.Tensor) -> None:
        self.sums[key] = v.clone() if key not in self.sums else self.sums[key].add_(v)

    def _xtx(self, raw: torch.Tensor, x: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        # the same tensor object fed to several modules in one call (a Llama layer's q/k/v, its gate/up): compute
        # X^T X once. ``raw`` is the tensor the call passed, ``x`` what the module multiplies (its own online
        # rotation of ``raw``, or ``raw`` itself); only the latter is shared. The cache keeps the tensor alive so
        # its id cannot be reused within the batch.
        if x.data_ptr() != raw.data_ptr() or tuple(x.shape) != tuple(raw.shape):
            return gram(x2)  # the module's own transform of the input: not shared
        key = (id(raw), raw.data_ptr(), tuple(raw.shape))
        if key not in self._shared:
            self._shared[key] = (raw, gram(x2))  # (in, in)
        return self._shared[key][1]

    def _hook_for(self, name: str, req: Request):
        is_conv = isinstance(req.module, nn.modules.conv._ConvNd)

        def hook(mod: nn.Module, args: tuple) -> None:
            raw = args[0]
            x = module_input(mod, raw.detach())  # after the layer's own online rotation, if it has one
            if x.numel() == 0:
                return
            if name in self.observers:
                self.observers[name].update(x.float())
            x2 = x.reshape(-1, x.shape[-1]).float()
            # a convolution's row is an image; anything else (a linear fed (B, H, W, C) too) has one per vector
            self.rows[name] += x.shape[0] if is_conv else x2.shape[0]
            if req.importance:
                self._add((name, "sumsq"), x2.pow(2).sum(0))
            if req.abs_mean:
                if is_conv:  # mean |x| per input channel (per image, summed), one per patch column (c, kernel pos)
                    per = x.float().abs().transpose(0, 1).reshape(x.shape[1], -1).mean(1) * x.shape[0]
                    self._add((name, "abssum"), per.repeat_interleave(math.prod(mod.kernel_size)))
                else:
                    self._add((name, "abssum"), x2.abs().sum(0))
            if req.hessian and is_conv and mod.groups > 1:  # one X^T X per group: (groups, cols, cols)
                P = conv_patches(mod, x, grouped=True)
                P = P.reshape(P.shape[0], mod.groups, -1).transpose(0, 1)  # (groups, positions, cols)
                self._add((name, "xtx"), P.transpose(1, 2) @ P)
            elif req.hessian:
                self._add((name, "xtx"), gram(conv_patches(mod, x)) if is_conv else self._xtx(raw, x, x2))
            if req.mean:
                xc = x.float().transpose(0, 1).reshape(x.shape[1], -1) if is_conv else x2.t()  # (channels, n)
                self._add((name, "sum"), xc.sum(1))
                self.mean_count[name] += xc.shape[1]
            self._order.append(name)
            if name == self._stop_after:
                raise StopObserving
        return hook

    def result(self, where: str = "the calibration data") -> dict[str, InputStats]:
        """The statistics of every wanted module.

        Raises:
            InputError: no batch was seen, or a module never ran.
        """
        routed = [n for n, r in self.wanted.items() if r.routed]
        if self.n_batches == 0 or (not any(self.rows.values()) and len(routed) < len(self.wanted)):
            raise InputError("the calibration data set is empty: it yielded no batch (or only empty ones)")
        silent = [n for n, r in self.rows.items() if r == 0 and not self.wanted[n].routed]
        if silent:
            raise InputError(f"module(s) {', '.join(silent[:5])} never ran on {where}; "
                             "check that the data reaches them")
        out = {}
        for n in self.wanted:
            if self.rows[n] == 0:  # an expert no token was routed to: nothing seen
                out[n] = InputStats(None, None, 0)
                continue
            rng = None
            if n in self.observers:
                r = self.observers[n].compute()
                rng = (r.lo, r.hi)
            per_row = {stat: self.sums[(n, stat)] / self.rows[n] for stat in ("sumsq", "xtx", "abssum")
                       if (n, stat) in self.sums}
            mean = self.sums[(n, "sum")] / self.mean_count[n] if (n, "sum") in self.sums else None
            out[n] = InputStats(rng, per_row.get("sumsq"), self.rows[n], mean, per_row.get("xtx"),
                                per_row.get("abssum"))
        return out


def conv_patches(conv: nn.Module, x: torch.Tensor, grouped: bool = False) -> torch.Tensor:
    """The input vectors a 1-D/2-D convolution's weight multiplies: ``(positions, in * prod(kernel))`` float32,
    one row per output position and image, columns in the order of ``weight.reshape(out, -1)``. Padding
    (``padding_mode`` and ``"same"`` included), stride and dilation as the layer applies them. A grouped
    convolution is refused unless ``grouped``: then group ``g``'s patches are the columns
    ``g * cols .. (g + 1) * cols`` (``cols = in / groups * prod(kernel)``)."""
    if conv.groups != 1 and not grouped:
        raise InputError(f"{type(conv).__name__} with groups={conv.groups}: its input patches differ per group")
    one_d = x.dim() == 3
    x = x.float().unsqueeze(2) if one_d else x.float()  # (N, C, 1, L) for a 1-D convolution
    pad = conv.padding
    if isinstance(pad, str) or conv.padding_mode != "zeros":  # pad explicitly, as the layer's forward does
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        amounts = conv._reversed_padding_repeated_twice
        x = F.pad(x, ((*amounts, 0, 0) if one_d else tuple(amounts)), mode=mode)
        pad = (0,) * (1 if one_d else 2)

    def two(v: Any) -> tuple[int, int]:
        v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
        return (1, *v) if one_d else (v * 2 if len(v) == 1 else v)

    padding = (0, *pad) if one_d else (tuple(pad) * 2 if len(tuple(pad)) == 1 else tuple(pad))
    cols = F.unfold(x, two(conv.kernel_size), dilation=two(conv.dilation), padding=padding,
                    stride=two(conv.stride))  # (N, C * kernel, positions)
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def gram(x: torch.Tensor, chunk: int = 384) -> torch.Tensor:
    """``x.T @ x`` for ``x`` ``(n, d)`` float32, computing only the blocks on and above the diagonal.

    With ``k = ceil(d / chunk)`` column chunks this takes ``(k + 1) / (2k)`` of the full product's
    arithmetic (62.5% at ``d = 1536``), the rest being copies of the transposed blocks. Under CPU autocast
    (``calib_dtype="bfloat16"``) ``x`` is cast to bf16 once, not once per product (the same numbers, up to
    twice as fast); the result is float32 either way.
    """
    d = x.shape[1]
    dtype = x.dtype
    if x.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        x = x.to(torch.get_autocast_dtype("cpu"))
    if d <= chunk:
        return (x.t() @ x).to(dtype)
    out = torch.empty(d, d, dtype=dtype, device=x.device)
    starts = list(range(0, d, chunk))
    for a in starts:
        xa = x[:, a:a + chunk]
        block = xa.t() @ x[:, a:]  # (chunk, d - a): the diagonal block and everything right of it
        out[a:a + chunk, a:] = block
        out[a + chunk:, a:a + chunk] = block[:, chunk:].t()
    return out


def collect_input_stats(
    model: nn.Module,
    wanted: dict[str, Request],
    data: Iterable[Any],
    progress: bool = True,
    early_stop: bool = False,
) -> dict[str, InputStats]:
    """Run ``model`` on ``data`` once, observing the inputs of the modules in ``wanted``.

    ``early_stop``: the model's outputs are not needed, so after a first batch in which every wanted module
    ran once, each later batch stops as soon as the last of them has been observed (see
    :class:`InputCollector`); the statistics are the same.

    Raises:
        InputError: ``data`` holds no batch, or a module never ran.
    """
    with InputCollector(wanted, early_stop=early_stop) as c, torch.inference_mode():
        for b in tqdm(batches(data), total=batch_count(data), desc="calibrate", unit="batch",
                      disable=not progress, leave=False):
            c.new_batch()
            try:
                run_model(model, b, check_fit=c.n_batches == 1)
            except StopObserving:
                pass
    out = c.result()
    log.info("calibrated %d module(s) on %d batch(es)", len(out), c.n_batches)
    return out


def _accepts_use_cache(model: nn.Module) -> bool:
    """Whether ``model`` takes ``use_cache``: named in its forward, or passed on through ``**kwargs`` by a
    generating transformers model (LLaVA-style models hand it to their language model that way)."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if "use_cache" in params:
        return True
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return takes_kwargs and hasattr(model, "config") and hasattr(model, "generate")

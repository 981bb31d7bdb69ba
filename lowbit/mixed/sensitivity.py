"""How much each quantizable layer's error costs the model, per candidate format.

For every layer ``l`` and candidate format ``f``, the candidate weight ``Q`` is what the chosen algorithm gives
(round to nearest, GPTQ, AWQ...) from the float model's own input statistics, and ``E = W - Q`` its error
(an AWQ input scale folded into ``Q``). Four measures, each a function here:

- ``proxy``: the layer's output error ``trace(E H E^T)`` with ``H = X^T X / n`` of its calibration inputs: what
  GPTQ minimizes; cheap, but blind to how much that output matters downstream.
- ``fisher``: the same error weighted per output feature by the mean squared gradient of the loss at that output,
  ``1/2 sum_r G_r (E H E^T)_rr`` (a Kronecker-factored, diagonal-in-outputs Fisher approximation of the loss
  change, as in the Fisher-weighted reconstruction of Li et al., "BRECQ", ICLR 2021). One backward pass per
  batch on top of the proxy.
- ``hutchinson``: HAWQ-V2's measure (Dong et al., NeurIPS 2020): the mean Hessian trace of the loss over the
  layer's weights, estimated by Hutchinson's method (``E[v^T H v]`` for Rademacher ``v``, one Hessian-vector
  product per sample for all layers at once), times ``||E||^2``.
- ``kl``: the direct measure: the model's output KL divergence from the float model, in nats per token (or per
  image), with only that layer group quantized, on held-out batches.

The loss of the gradient measures is the model's cross-entropy on labels sampled from its own float output
distribution (a fixed seed): its expected Hessian is the model's Fisher information, and no labels are needed,
for language models and classifiers alike.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration.capture import InputStats, Request, collect_input_stats, run_model
from lowbit.errors import InputError
from lowbit.nn.base import QuantModule
from lowbit.nn.convert import _is_hf_conv1d, float_weight, to_quantized
from lowbit.plan import Rule
from lowbit.quantizer import quantize_weight
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

MEASURES = ("proxy", "fisher", "hutchinson", "kl")


@dataclass
class Candidate:
    """One layer under one format.

    module: the quantized layer (packed: its storage, not a float copy of the weight).
    bits: storage bits of the quantized weight (codes, scales, zero points, input scale).
    row_error: float64 ``(out,)``: ``diag(E H E^T)``, each output feature's error on the calibration inputs.
    sq_error: ``||E||^2``.
    """

    module: QuantModule
    bits: int
    row_error: torch.Tensor
    sq_error: float

    def effective(self) -> torch.Tensor:
        """The float32 weight the model computes with (dequantized, times the input scale if any)."""
        return self.module.effective_weight().float()


def input_groups(model: nn.Module, batch: Any, names: Sequence[str]) -> list[list[str]]:
    """``names`` grouped by the input they share in one forward pass on ``batch``: modules fed the same tensor in the
    same call (a Llama layer's q/k/v, its gate/up) form one group, in the order they first run.

    Raises:
        InputError: a module of ``names`` did not run on ``batch``.
    """
    keys: dict[str, tuple] = {}
    alive: list[torch.Tensor] = []  # each input kept alive, so no id is reused during the pass
    handles = []

    def hook_for(n: str) -> Callable:
        def hook(mod: nn.Module, args: tuple) -> None:
            if n not in keys and args and isinstance(args[0], torch.Tensor):
                x = args[0]
                alive.append(x)
                keys[n] = (id(x), x.data_ptr(), tuple(x.shape))
        return hook

    modules = dict(model.named_modules())
    try:
        for n in names:
            handles.append(modules[n].register_forward_pre_hook(hook_for(n)))
        with torch.inference_mode():
            run_model(model, batch)
    finally:
        for h in handles:
            h.remove()
    silent = [n for n in names if n not in keys]
    if silent:
        raise InputError(f"module(s) {', '.join(silent[:5])} did not run on the first calibration batch; the search "
                         f"measures layers the data reaches")
    groups: dict[tuple, list[str]] = {}
    for n in sorted(names, key=list(keys).index):
        groups.setdefault(keys[n], []).append(n)
    return list(groups.values())


def input_statistics(model: nn.Module, names: Sequence[str], method_rule: Rule, data: Iterable[Any],
                     progress: bool = True) -> dict[str, InputStats]:
    """One float pass over ``data``: each layer's ``X^T X / n`` (and what ``method_rule``'s algorithm needs)."""
    modules = dict(model.named_modules())
    needed = set(method_rule.method.stats_needed)
    requests = {n: Request(modules[n], hessian=True, importance="importance" in needed,
                           abs_mean="abs_mean" in needed) for n in names}
    return collect_input_stats(model, requests, data, progress)


def candidates(model: nn.Module, names: Sequence[str], specs: Sequence[QuantSpec], method: Any,
               stats: dict[str, InputStats], progress: bool = True, per_layer: dict[str, Any] | None = None
               ) -> dict[tuple[str, str], Candidate]:
    """Every layer of ``names`` quantized to every spec by ``method`` (a name or config, as in a rule; ``per_layer``
    overrides it for the layers it names), from the float model's input statistics (which must hold
    ``X^T X / n``): ``{(layer, spec name): Candidate}``."""
    per_layer = per_layer or {}
    modules = dict(model.named_modules())
    out: dict[tuple[str, str], Candidate] = {}
    work = [(n, s) for s in specs for n in names]
    for n, spec in tqdm(work, desc="candidates", unit="layer", disable=not progress):
        m = modules[n]
        W = float_weight(m)
        r = quantize_weight(W, Rule("*", spec, per_layer.get(n, method)), stats.get(n))
        qm = to_quantized(m, r.q, input_scale=r.input_scale)
        E = W.float() - qm.effective_weight().float().reshape(W.shape)
        out[(n, spec.name)] = Candidate(qm, 8 * qm.storage_bytes(), row_errors(E, stats[n].hessian),
                                        float(E.double().pow(2).sum()))
    return out


def row_errors(E: torch.Tensor, H: torch.Tensor) -> torch.Tensor:
    """``diag(E H E^T)`` in float64 for a weight error ``E`` (lowbit's layout) and its layer's ``H``: ``(out,)``, each
    output feature's mean squared error over the inputs ``H`` was taken on. A grouped convolution's ``H`` is one
    matrix per group of output channels."""
    E = E.reshape(E.shape[0], -1).double()
    H = H.double()
    if H.dim() == 3:
        g = H.shape[0]
        Eg = E.reshape(g, E.shape[0] // g, -1)
        return ((Eg @ H) * Eg).sum(-1).reshape(-1)
    return ((E @ H) * E).sum(-1)


def sampled_labels(logits: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Labels drawn from the softmax of ``logits`` (..., classes): ``(...)`` int64."""
    probs = torch.softmax(logits.detach().float().reshape(-1, logits.shape[-1]), -1)
    return torch.multinomial(probs, 1, generator=generator).reshape(logits.shape[:-1])


def model_logits(model: nn.Module, batch: Any) -> torch.Tensor:
    """The model's output logits on ``batch`` (``.logits`` of a transformers output, or the tensor itself)."""
    out = run_model(model, batch)
    logits = getattr(out, "logits", out)
    if isinstance(logits, (tuple, list)):
        logits = logits[0]
    if not isinstance(logits, torch.Tensor) or not logits.is_floating_point():
        raise InputError(f"{type(model).__name__} returned {type(logits).__name__}, not logits; the search needs a "
                         f"model whose output is a tensor of class or token logits")
    return logits


@contextlib.contextmanager
def _gradients_for(model: nn.Module, params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Inside the block only ``params`` of ``model`` take gradients; every parameter's setting is restored after."""
    before = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, r in zip(model.parameters(), before):
            p.requires_grad_(r)


def _sampled_nll(model: nn.Module, batch: Any, gen: torch.Generator, reduction: str) -> torch.Tensor:
    """The gradient measures' loss: cross-entropy of the model's logits on labels drawn from them (``gen``)."""
    logits = model_logits(model, batch)
    y = sampled_labels(logits, gen)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1), reduction=reduction)


def output_fisher(model: nn.Module, names: Sequence[str], batches: Sequence[Any], seed: int = 0,
                  progress: bool = True) -> dict[str, torch.Tensor]:
    """Per layer, the mean over its output rows (tokens, or positions) of the squared loss gradient at each output
    feature: ``{name: (out,)}`` float64. The loss: cross-entropy on labels sampled from the float output."""
    modules = dict(model.named_modules())
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {n: 0 for n in names}

    def hook_for(n: str) -> Callable:
        conv = isinstance(modules[n], nn.modules.conv._ConvNd)

        def on_grad(g: torch.Tensor) -> None:
            g = g.detach()  # a convolution's (N, C, *spatial): rows are its output positions
            g2 = g.movedim(1, -1).reshape(-1, g.shape[1]) if conv else g.reshape(-1, g.shape[-1])
            sq = g2.double().pow(2).sum(0)
            sums[n] = sq if n not in sums else sums[n] + sq
            rows[n] += g2.shape[0]

        def hook(mod: nn.Module, args: tuple, out: Any) -> None:  # the gradient at the module's output
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.register_hook(on_grad)
        return hook

    gen = torch.Generator().manual_seed(seed)
    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:  # gradients for the measured weights only, so that one flows to every measured output
        with _gradients_for(model, [modules[n].weight for n in names]):
            for batch in tqdm(batches, desc="output gradients", unit="batch", disable=not progress):
                _sampled_nll(model, batch, gen, "sum").backward()
                model.zero_grad(set_to_none=True)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in names if rows[n] == 0]
    if missing:
        raise InputError(f"no gradient reached {', '.join(missing[:5])}; the search measures layers the loss "
                         f"depends on")
    return {n: sums[n] / rows[n] for n in names}


def hutchinson_traces(model: nn.Module, names: Sequence[str], batches: Sequence[Any], samples: int = 8,
                      seed: int = 0, progress: bool = True) -> dict[str, float]:
    """HAWQ-V2's mean Hessian trace per layer, ``Tr(H_l) / n_l`` of the loss over layer ``l``'s weights, by
    Hutchinson's estimator: ``samples`` Rademacher vectors per batch, one Hessian-vector product each (for every
    layer at once). Attention runs on torch's math kernel here (the fused ones have no second derivative)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    modules = dict(model.named_modules())
    params = [modules[n].weight for n in names]
    gen = torch.Generator().manual_seed(seed)
    sums = [0.0] * len(names)
    count = 0
    with _gradients_for(model, params), sdpa_kernel(SDPBackend.MATH):
        for batch in tqdm(batches, desc="Hessian traces", unit="batch", disable=not progress):
            g = torch.autograd.grad(_sampled_nll(model, batch, gen, "mean"), params, create_graph=True)
            for _ in range(samples):
                vs = [torch.randint(0, 2, p.shape, generator=gen).to(p.dtype) * 2 - 1 for p in params]
                hv = torch.autograd.grad(g, params, grad_outputs=vs, retain_graph=True)
                for i, (v, h) in enumerate(zip(vs, hv)):
                    sums[i] += float((v * h).sum())
                count += 1
            del g
    if count == 0:
        raise InputError("Hutchinson's estimator got no batch")
    return {n: sums[i] / count / params[i].numel() for i, n in enumerate(names)}


def output_kl(model: nn.Module, batches: Sequence[Any], reference: Sequence[torch.Tensor]) -> float:
    """Mean KL(reference || model) of the softmax outputs, nats per output row (token or image)."""
    total, rows = 0.0, 0
    with torch.inference_mode():
        for batch, ref in zip(batches, reference):
            logits = model_logits(model, batch).double()  # float64: a small KL is a difference of close numbers
            lp = torch.log_softmax(logits.reshape(-1, logits.shape[-1]), -1)
            lr = torch.log_softmax(ref.double().reshape(-1, ref.shape[-1]), -1)
            total += float((lr.exp() * (lr - lp)).sum())
            rows += lp.shape[0]
    return total / max(rows, 1)


def direct_kl(model: nn.Module, groups: Sequence[Sequence[str]], specs: Sequence[QuantSpec],
              cands: dict[tuple[str, str], Candidate], batches: Sequence[Any], progress: bool = True
              ) -> dict[tuple[int, str], float]:
    """Per (group index, spec name): the output KL with only that group's layers on their candidate weights."""
    modules = dict(model.named_modules())
    with torch.inference_mode():
        reference = [model_logits(model, b).float() for b in batches]
    out = {}
    work = [(i, s) for i in range(len(groups)) for s in specs]
    for i, spec in tqdm(work, desc="direct KL", unit="run", disable=not progress):
        saved = {n: modules[n].weight.data for n in groups[i]}
        try:
            for n in groups[i]:
                set_float_weight(modules[n], cands[(n, spec.name)].effective())
            out[(i, spec.name)] = output_kl(model, batches, reference)
        finally:
            for n, d in saved.items():
                modules[n].weight.data = d
    return out


def set_float_weight(m: nn.Module, w: torch.Tensor) -> None:
    """Point float module ``m``'s weight at ``w`` (lowbit's layout, see ``float_weight``): transposed back for a
    Hugging Face ``Conv1D``, in the weight's dtype."""
    w = w.to(m.weight.dtype)
    m.weight.data = w.t() if _is_hf_conv1d(m) else w.reshape(m.weight.shape)


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (average ranks for ties; NaN when one is constant)."""
    from scipy.stats import spearmanr

    if len(a) != len(b) or len(a) < 2:
        raise InputError(f"rank correlation needs two sequences of equal length >= 2, got {len(a)} and {len(b)}")
    if len(set(a)) < 2 or len(set(b)) < 2:
        return float("nan")
    return float(spearmanr(a, b).statistic)

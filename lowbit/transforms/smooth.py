"""SmoothQuant (Xiao et al. 2023): move activation outliers into the weights with per-channel scales.

A few input channels of a transformer's linears carry activations 10-100x larger than the rest, so a per-token
(or per-tensor) activation scale wastes almost all of its levels on them. For a producer ``P`` whose output
channel ``j`` feeds linears ``W`` (a norm's gain, or a linear's output row), dividing channel ``j`` of
``P``'s output by ``s_j`` and multiplying column ``j`` of every consumer by ``s_j`` leaves the product
unchanged and flattens the activation; the paper's scale is

    s_j = max|X_j|^alpha / max_k |W_kj|^(1 - alpha)

with ``max|X_j|`` over calibration tokens and the weight maximum over every consumer sharing the input.

Pairs smoothed (from the architecture table, ``lowbit.models.arch``):

* every norm and the linears it feeds (q/k/v and gate/up, or GPT-2's ``c_attn`` / ``c_fc``): the norm's gain
  (and a LayerNorm's bias) divided by ``s``;
* the MLP's up projection and its down projection where the table lists the pair (Llama/SmolLM2 and Gemma-3:
  ``down(act(gate) * up)`` is linear in ``up``'s output): ``up``'s rows divided by ``s``.

Pairs whose consumers the plan does not quantize with activation quantization are left alone. ``alpha`` is
chosen per block, from ``ALPHAS`` and "no smoothing", by the block's output error on calibration data
(``SEARCH_ROWS`` rows of it): each candidate is applied, the block's linears that the plan quantizes are
simulated with its formats (weights rounded to nearest, activations as the rule says) and the block's output
is compared with the float block's (mean squared error); the best is kept. SmoothQuant's own default is a
fixed 0.5 (0.75-0.85 for some models, section 5); searching it per block is the refinement of later work
(e.g. OmniQuant learns the scales).

It needs calibration data (``quantize(..., data=)``) and is exact in float arithmetic: the float model's
outputs move by rounding only. After a rotation it scales the rotated channels; before one it would be undone
(the rotation's ``fuse_norms`` step moves the scaled gains back into the weights), so ``check_transforms``
refuses that order.

:func:`awq_scales` is the same machinery with AWQ's scale rule (``mean|x_j|^alpha``, Lin et al. 2024) for
weight-only plans: one scale per norm shared by the linears it feeds, folded into the norm, so the quantized
layers need no input scale of their own.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.errors import InputError
from lowbit.formats import fake_quantize, fake_quantize_dynamic
from lowbit.nn.convert import float_weight
from lowbit.nn.roles import module_roles

if TYPE_CHECKING:
    from lowbit.plan import QuantPlan, Rule
    from lowbit.transforms import Originals

log = logging.getLogger(__name__)

ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
SEARCH_ROWS = 16  # calibration rows (sequences) the search runs each block on
MIN_SCALE = 1e-5


@dataclass(frozen=True)
class Pair:
    """A producer whose output channels feed ``consumers`` (full names). ``kind``: "norm" or "linear"."""

    producer: str
    consumers: tuple[str, ...]
    kind: str
    gain_offset: float = 0.0


def smoothquant(model: nn.Module, originals: "Originals | None" = None, *, data: Any = None,
                plan: "QuantPlan | None" = None, progress: bool = False) -> nn.Module:
    """Smooth ``model``'s activation outliers into its weights (see the module docstring); in place, returned.

    Raises InputError for missing data, an architecture the table does not know or that does not fit it.
    """
    return _scale_pairs(model, originals, data, plan, progress, "smoothquant")


def awq_scales(model: nn.Module, originals: "Originals | None" = None, *, data: Any = None,
               plan: "QuantPlan | None" = None, progress: bool = False) -> nn.Module:
    """AWQ's activation-aware scales (Lin et al. 2024), folded into the norms and up projections.

    Per pair ``s_j = mean|x_j|^alpha`` (normalized by ``sqrt(max s * min s)``), ``alpha`` in ``AWQ_ALPHAS``
    chosen per block by the block's output error with the plan's weight formats simulated; the same pairs and
    the same folding as :func:`smoothquant`, for weight-only plans: every consumer of a norm shares one ``s``
    (AWQ's reference code groups q/k/v and gate/up the same way), so nothing is left in the layers and the
    result exports like any model. ``method: awq`` in a rule instead keeps one ``s`` per layer as its input
    scale, for layers no norm feeds.
    """
    return _scale_pairs(model, originals, data, plan, progress, "awq_scales")


AWQ_ALPHAS = tuple(i / 20 for i in range(20))


def _scale_pairs(model: nn.Module, originals: "Originals | None", data: Any, plan: "QuantPlan | None",
                 progress: bool, rule_name: str) -> nn.Module:
    from lowbit.calibration.blocks import find_blocks
    from lowbit.calibration.capture import batches
    from lowbit.calibration.sequential import capture_block_inputs
    from lowbit.transforms import Originals

    if data is None:
        raise InputError(f"the {rule_name} transform needs calibration data (quantize(..., data=...), or a command "
                         f"that loads calibration text)")
    if plan is None:
        raise InputError(f"the {rule_name} transform needs the plan (its formats decide the scales)")
    pairs = smoothing_pairs(model)
    blocks = find_blocks(model)
    roles = module_roles(model)
    rules = {n: plan.rule_for(n, m, roles) for n, m in model.named_modules()}
    if rule_name == "smoothquant":
        pairs = [p for p in pairs if any(rules.get(c) is not None and rules[c].act is not None for c in p.consumers)]
        what = "quantizes its activations"
    else:
        pairs = [p for p in pairs if any(rules.get(c) is not None for c in p.consumers)]
        what = "is quantized"
    if not pairs:
        log.warning("%s: no linear fed by a smoothing pair %s in this plan; nothing to scale", rule_name, what)
        return model
    subset, rows = [], 0
    for b in batches(data):
        subset.append(b)
        rows += int(b.shape[0]) if isinstance(b, torch.Tensor) else 1
        if rows >= SEARCH_ROWS:
            break
    own = originals if originals is not None else Originals()
    inputs = capture_block_inputs(model, blocks, subset, progress)
    modules = dict(model.named_modules())
    alphas = ALPHAS if rule_name == "smoothquant" else AWQ_ALPHAS
    scale = _smooth_scales if rule_name == "smoothquant" else _awq_scales
    chosen = []
    with torch.no_grad():
        for i, (bname, block) in enumerate(tqdm(blocks, desc=rule_name, unit="block", disable=not progress)):
            mine = [p for p in pairs if p.producer.startswith(bname + ".")]
            ref = [inputs.run(i, block, b) for b in range(len(inputs.hidden))]
            if mine:
                stats = _input_stats(inputs, i, block, mine, modules)
                best = _search(inputs, i, block, bname, mine, stats, modules, rules, ref, alphas, scale)
                chosen.append(best)
                if best is not None:
                    for p in mine:
                        _apply(p, scale(p, stats[p.producer], best, modules), modules, own)
            for b in range(len(inputs.hidden)):
                inputs.hidden[b] = ref[b]  # an equivalence: the float outputs are the next block's inputs
    picked = ", ".join("none" if a is None else f"{a:.2f}" for a in chosen)
    log.info("%s: %d pair(s) over %d block(s); alpha per block: %s", rule_name, len(pairs), len(blocks), picked)
    return model


def smoothing_pairs(model: nn.Module) -> list[Pair]:
    """Every (producer -> consumers) pair SmoothQuant may scale in ``model``, from the architecture table."""
    from lowbit.calibration.blocks import find_blocks
    from lowbit.models.arch import family_of, norm_groups

    _, family = family_of(model)
    blocks = {b for b, _ in find_blocks(model)}
    pairs = [Pair(g.norm, g.linears, "norm", g.gain_offset) for g in norm_groups(model)
             if any(g.norm.startswith(b + ".") for b in blocks)]  # the final norm -> head pair is left out
    modules = dict(model.named_modules())
    for b in sorted(blocks):
        for prod, cons in family.smooth_linears:
            p, c = f"{b}.{prod}", f"{b}.{cons}"
            if p not in modules or c not in modules:
                raise InputError(f"module {p if p not in modules else c!r} not found: the architecture table smooths "
                                 f"{prod} -> {cons} in each block; this model does not fit lowbit/models/arch.py")
            pairs.append(Pair(p, (c,), "linear"))
    return pairs


# ---- helpers ---------------------------------------------------------------------------------------------------


def _input_stats(inputs, i: int, block: nn.Module, pairs: list[Pair], modules: dict) -> dict[str, dict]:
    """Per pair: ``max |x_j|`` and ``mean |x_j|`` (float64 ``(channels,)``) over the block's calibration inputs
    of its first consumer."""
    found: dict[str, dict] = {}
    first = {p.consumers[0]: p.producer for p in pairs}

    def hook_for(producer: str):
        def hook(mod, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).abs().double()
            st = found.setdefault(producer, {"max": x.amax(0), "sum": torch.zeros_like(x[0]), "n": 0})
            st["max"] = torch.maximum(st["max"], x.amax(0))
            st["sum"] += x.sum(0)
            st["n"] += x.shape[0]
        return hook

    handles = [modules[c].register_forward_pre_hook(hook_for(p)) for c, p in first.items()]
    try:
        for b in range(len(inputs.hidden)):
            inputs.run(i, block, b)
    finally:
        for h in handles:
            h.remove()
    for p in pairs:
        if p.producer not in found:
            raise InputError(f"module {p.consumers[0]!r} did not run on the calibration data; the scales cannot "
                             f"be measured")
    return {k: {"max": v["max"], "mean": v["sum"] / max(v["n"], 1)} for k, v in found.items()}


def _smooth_scales(p: Pair, stats: dict, alpha: float, modules: dict) -> torch.Tensor:
    """SmoothQuant's ``max|X_j|^alpha / max|W_j|^(1 - alpha)`` (float64 ``(in,)``)."""
    wmax = torch.stack([float_weight(modules[c]).abs().amax(0).double() for c in p.consumers]).amax(0)  # (in,)
    s = stats["max"].clamp_min(MIN_SCALE).pow(alpha) / wmax.clamp_min(MIN_SCALE).pow(1 - alpha)
    return s.clamp_min(MIN_SCALE)


def _awq_scales(p: Pair, stats: dict, alpha: float, modules: dict) -> torch.Tensor:
    """AWQ's ``mean|x_j|^alpha``, divided by ``sqrt(max s * min s)`` so the scales centre on 1."""
    s = stats["mean"].clamp_min(MIN_SCALE).pow(alpha)
    return (s / (s.max() * s.min()).sqrt()).clamp_min(MIN_SCALE)


def _apply(p: Pair, s: torch.Tensor, modules: dict, originals: "Originals") -> None:
    """Divide the producer's output channels by ``s``, multiply the consumers' input columns by ``s``."""
    prod = modules[p.producer]
    if p.kind == "norm":
        w = getattr(prod, "weight", None)
        if w is None:
            raise InputError(f"module {p.producer!r} has no gain to divide: smoothquant needs an affine norm")
        originals.keep(prod, "weight")
        w.copy_(((w.detach().double() + p.gain_offset) / s - p.gain_offset).to(w.dtype))
        bias = getattr(prod, "bias", None)
        if bias is not None:
            originals.keep(prod, "bias")
            bias.copy_((bias.detach().double() / s).to(bias.dtype))
    else:
        _scale_rows(prod, 1.0 / s, originals)
    for c in p.consumers:
        _scale_columns(modules[c], s, originals)


def _scale_rows(lin: nn.Module, f: torch.Tensor, originals: "Originals") -> None:
    originals.keep(lin, "weight")
    transposed = not isinstance(lin, nn.Linear)  # Conv1D stores (in, out)
    w = lin.weight
    w.copy_((w.detach().double() * (f[None, :] if transposed else f[:, None])).to(w.dtype))
    if lin.bias is not None:
        originals.keep(lin, "bias")
        lin.bias.copy_((lin.bias.detach().double() * f).to(lin.bias.dtype))


def _scale_columns(lin: nn.Module, f: torch.Tensor, originals: "Originals") -> None:
    originals.keep(lin, "weight")
    transposed = not isinstance(lin, nn.Linear)
    w = lin.weight
    w.copy_((w.detach().double() * (f[:, None] if transposed else f[None, :])).to(w.dtype))


def _search(inputs, i: int, block: nn.Module, bname: str, pairs: list[Pair], stats: dict, modules: dict,
            rules: dict, ref: list[torch.Tensor], alphas: tuple[float, ...], scale) -> float | None:
    """The alpha (or None: no smoothing) whose smoothed, simulated block is closest to the float block."""
    from lowbit.transforms import Originals

    linears = [(n, m) for n, m in modules.items() if n.startswith(bname + ".") and rules.get(n) is not None
               and hasattr(m, "weight") and isinstance(getattr(m, "weight"), torch.Tensor) and m.weight.dim() == 2]
    best, best_err = None, None
    for alpha in (None, *alphas):
        trial = Originals()
        try:
            if alpha is not None:
                for p in pairs:
                    _apply(p, scale(p, stats[p.producer], alpha, modules), modules, trial)
            err = _simulated_error(inputs, i, block, linears, rules, ref, trial)
        finally:
            trial.restore()
        if best_err is None or err < best_err:
            best, best_err = alpha, err
    return best


def _simulated_error(inputs, i: int, block: nn.Module, linears: list, rules: dict, ref: list[torch.Tensor],
                     trial: "Originals") -> float:
    """Mean squared error of the block with its quantized linears simulated (RTN weights, quantized inputs)."""
    handles = []
    for n, m in linears:
        rule: "Rule" = rules[n]
        trial.keep(m, "weight")
        transposed = not isinstance(m, nn.Linear)
        w = float_weight(m)  # (out, in)
        wq = fake_quantize(w.float(), rule.weight).to(m.weight.dtype)
        m.weight.copy_(wq.t() if transposed else wq)
        if rule.act is not None:
            handles.append(m.register_forward_pre_hook(_act_hook(rule)))
    try:
        total, count = 0.0, 0
        for b in range(len(inputs.hidden)):
            out = inputs.run(i, block, b)
            total += float((out.double() - ref[b].double()).pow(2).sum())
            count += out.numel()
        return total / max(count, 1)
    finally:
        for h in handles:
            h.remove()


def _act_hook(rule: "Rule"):
    act = rule.act

    def hook(mod, args):
        x = args[0]
        x2 = x.reshape(-1, x.shape[-1]).float()
        if act.dynamic:
            y = fake_quantize_dynamic(x2, act.spec, act.clip)
        else:  # a static range: this batch's min-max stands in for the calibrated one
            y = fake_quantize(x2, act.spec, x2.min().reshape(1, 1), x2.max().reshape(1, 1))
        return (y.to(x.dtype).reshape(x.shape), *args[1:])
    return hook

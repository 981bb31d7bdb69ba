"""``quantize(model, plan, data=None)``: replace a model's layers by quantized ones, following a plan.

Prepare (select modules, validate) -> feed data (only if the plan needs statistics) -> convert (run each
module's algorithm on its weight, swap in the quantized module). The model is changed in place and
returned; it keeps working as an ``nn.Module`` with the same call signature.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.bias_correction import bias_correction
from lowbit.algorithms.gptq import gptq
from lowbit.algorithms.rtn import rtn
from lowbit.calibration import InputStats, Request, collect_input_stats
from lowbit.errors import InputError
from lowbit.formats import QuantizedTensor, as_matrix_shape
from lowbit.nn.convert import (
    SUPPORTED,
    float_weight,
    is_linear_like,
    is_quantizable,
    to_quantized,
    unsupported_subclass,
)
from lowbit.plan import QuantPlan, Rule
from lowbit.spec import QuantSpec

log = logging.getLogger(__name__)

_WILDCARDS = set("*?[")


@dataclass(frozen=True)
class Target:
    """One module chosen by the plan."""

    name: str
    module: nn.Module
    rule: Rule


def quantize(
    model: nn.Module,
    plan: QuantPlan | QuantSpec | str,
    data: Any = None,
    *,
    progress: bool = True,
) -> nn.Module:
    """Quantize ``model`` in place according to ``plan`` and return it.

    Args:
        model: any ``nn.Module``; its supported layers (see ``lowbit.nn.convert.SUPPORTED``) are replaced.
        plan: a :class:`QuantPlan`, or a spec / scheme name for a uniform round-to-nearest plan.
        data: calibration batches (see ``lowbit.calibration.capture``); required when a rule quantizes
            activations statically or its algorithm needs data.
        progress: show progress bars.
    Raises:
        InputError: the plan selects nothing or an unsupported module, a spec does not fit a layer, a weight
            holds NaN/Inf, or data is missing or empty when needed. The model is unchanged then.
    """
    if isinstance(plan, (str, QuantSpec)):
        plan = QuantPlan.uniform(plan)
    targets = prepare(model, plan)
    stats = _calibrate(model, targets, data, progress)
    quantized: dict[str, nn.Module] = {}
    for t in tqdm(targets, desc="quantize", unit="layer", disable=not progress, leave=False):
        s = stats.get(t.name)
        try:
            q = quantize_weight(float_weight(t.module), t.rule, s)
        except InputError as e:
            raise InputError(f"module {t.name!r}: {e}") from None
        qm = to_quantized(t.module, q, t.rule.act)
        if s is not None and s.act_range is not None:
            qm.set_activation_range(*s.act_range)
        if t.rule.bias_correction:
            W = float_weight(t.module)
            qm.add_to_bias(-bias_correction(q.dequantize() - W.float(), s.mean, getattr(t.module, "groups", 1)))
        qm.train(t.module.training)
        quantized[t.name] = qm
    for name, qm in quantized.items():  # swap only once every layer succeeded: no half-quantized model
        model.set_submodule(name, qm)
    log.info("quantized %d module(s)", len(quantized))
    return model


def quantize_weight(weight: torch.Tensor, rule: Rule, stats: InputStats | None = None) -> QuantizedTensor:
    """Run ``rule``'s algorithm on one weight (lowbit layout, see ``float_weight``) with its input statistics."""
    method = rule.method
    if method.name == "rtn":
        weighted = getattr(method, "weighted", False)
        return rtn(weight, rule.weight, method, stats.importance if weighted else None)
    if method.name == "gptq":
        return gptq(weight, stats.hessian, rule.weight, method)
    raise InputError(f"algorithm {method.name!r} cannot run inside quantize() yet")


def prepare(model: nn.Module, plan: QuantPlan) -> list[Target]:
    """The modules ``plan`` quantizes, each checked to fit its spec (nothing is changed yet)."""
    targets = select_targets(model, plan)
    for t in targets:
        check_fits(t.name, float_weight(t.module), t.rule.weight)
    _log_partial_groups(targets)
    return targets


def select_targets(model: nn.Module, plan: QuantPlan) -> list[Target]:
    """The supported modules the plan quantizes, in module order; checks explicit names."""
    modules = dict(model.named_modules())
    for r in plan.rules:
        exact = not r.pattern.startswith("re:") and not (_WILDCARDS & set(r.pattern))
        if exact and r.pattern in modules and not is_quantizable(modules[r.pattern]):
            raise InputError(
                f"rule {r.pattern!r} names a {type(modules[r.pattern]).__name__}; lowbit quantizes {SUPPORTED}"
            )
    targets = []
    for name, m in modules.items():
        if name and is_quantizable(m):
            rule = plan.rule_for(name, m)
            if rule is not None:
                targets.append(Target(name, m, rule))
    odd = [n for n, m in modules.items() if unsupported_subclass(m) and plan.rule_for(n, m) is not None]
    if odd:
        log.warning("%d module(s) subclass a supported layer but compute their own forward, so they stay in "
                    "float: %s", len(odd), ", ".join(f"{n} ({type(modules[n]).__name__})" for n in odd[:5]))
    for r in plan.rules:
        if r.weight is not None and not any(t.rule is r for t in targets):
            log.warning("rule %r matched no quantizable module", r.pattern)
    if not targets:
        kinds = sorted({type(m).__name__ for m in modules.values() if is_quantizable(m)})
        raise InputError(
            f"the plan selects no module of this {type(model).__name__} (quantizable kinds present: "
            f"{', '.join(kinds) or 'none'}; skip patterns: {list(plan.skip)})"
        )
    return targets


def check_fits(name: str, weight: torch.Tensor, spec: QuantSpec) -> None:
    """Raise a clear InputError if ``spec`` cannot apply to ``weight`` of module ``name``."""
    rows, cols = as_matrix_shape(weight.shape)
    if spec.granularity == "group" and spec.group_size > cols:
        raise InputError(
            f"module {name!r}: group size {spec.group_size} is larger than its {cols} input elements "
            f"(weight {tuple(weight.shape)}); use per-channel ('-ch') or a group size <= {cols}"
        )
    if spec.granularity == "block" and (spec.block_shape[0] > rows or spec.block_shape[1] > cols):
        raise InputError(
            f"module {name!r}: block {spec.block_shape} does not fit weight {tuple(weight.shape)} "
            f"(2-D view {rows}x{cols})"
        )
    if not torch.isfinite(weight).all():
        bad = int((~torch.isfinite(weight)).sum())
        raise InputError(f"module {name!r}: weight {tuple(weight.shape)} holds {bad} NaN/Inf value(s)")


def _log_partial_groups(targets: list[Target]) -> None:
    """One line saying which layers end each row with a shorter group (it gets its own scale)."""
    partial: dict[tuple[int, int], list[str]] = {}
    for t in targets:
        spec = t.rule.weight
        cols = as_matrix_shape(float_weight(t.module).shape)[1]
        if spec.granularity == "group" and cols % spec.group_size:
            partial.setdefault((cols, spec.group_size), []).append(t.name)
    for (cols, group), names in partial.items():
        log.info("%d layer(s) have %d inputs, not a multiple of group %d: the last group of each row holds %d "
                 "and has its own scale (e.g. %s)", len(names), cols, group, cols % group, names[0])


def _calibrate(model: nn.Module, targets: list[Target], data: Any, progress: bool) -> dict:
    wanted = {}
    for t in targets:
        static_act = t.rule.act if t.rule.act is not None and not t.rule.act.dynamic else None
        method = t.rule.method.name
        hessian = method == "gptq"
        weighted = method == "rtn" and bool(getattr(t.rule.method, "needs_data", False))
        if (weighted or hessian) and not is_linear_like(t.module):
            raise InputError(f"module {t.name!r}: data-aware {t.rule.method.name} needs a linear layer, "
                             f"got {type(t.module).__name__}")
        if t.rule.bias_correction and isinstance(t.module, nn.Embedding):
            raise InputError(f"module {t.name!r}: bias correction does not apply to an embedding")
        if static_act is not None or weighted or hessian or t.rule.bias_correction:
            wanted[t.name] = Request(t.module, static_act, weighted, t.rule.bias_correction, hessian)
    if not wanted:
        return {}
    if data is None:
        names = ", ".join(list(wanted)[:3]) + (" ..." if len(wanted) > 3 else "")
        raise InputError(f"the plan needs calibration data (static activation ranges, bias correction or "
                         f"data-aware algorithms for {names}); pass data=")
    return collect_input_stats(model, wanted, data, progress)

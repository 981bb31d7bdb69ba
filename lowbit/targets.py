"""What a plan quantizes, checked before any work: :func:`prepare` selects the modules (:class:`Target`), checks
that each weight fits its format and holds no NaN/Inf, widens scale storage that would underflow, and gives each
layer an algorithm and activation quantization it can take, saying in one warning per kind before any work
starts which layers fall back to what (round to nearest for a layer a data-aware algorithm cannot take; float
activations for a convolution given per-token ones). ``lowbit.quantizer`` runs the result.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.algorithms import RTN
from lowbit.errors import InputError
from lowbit.formats import as_matrix_shape
from lowbit.formats.qtensor import scale_storage_issue
from lowbit.nn.convert import SUPPORTED, float_weight, is_linear_like, is_quantizable, unsupported_subclass
from lowbit.nn.roles import module_roles
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
    fallback_from: str | None = None  # the plan's algorithm, where prepare() replaced it (the layer misfits it)
    act_from: str | None = None  # the plan's activation quantization, where prepare() dropped it (misfit)


def prepare(model: nn.Module, plan: QuantPlan) -> list[Target]:
    """The modules ``plan`` quantizes, each checked to fit its spec (nothing is changed yet); none only for a
    plan with KV-cache quantization."""
    targets = select_targets(model, plan, allow_none=plan.kv is not None)
    _check_observers(plan)
    for t in targets:
        check_fits(t.name, float_weight(t.module), t.rule.weight)
        check_finite_params(t.name, t.module)
    targets = [_fit_scale_storage(t) for t in targets]
    targets = _fall_back(_act_fall_back(targets))
    _log_partial_groups(targets)
    return targets


def _check_observers(plan: QuantPlan) -> None:
    """Every rule's static activation observer built once with its settings: a bad setting is refused (naming the
    rule) before any data is read."""
    from lowbit.observers import make_observer

    for r in plan.rules:
        if r.act is not None and not r.act.dynamic and r.act.observer_settings:
            try:
                make_observer(r.act.observer, r.act.spec, **dict(r.act.observer_settings))
            except InputError as e:
                raise InputError(f"rule {r.pattern!r}: activation observer: {e}") from None


def data_aware_misfit(module: nn.Module, method: Any) -> str | None:
    """Why ``method`` cannot take ``module`` from its input statistics, or None if it can. A Hessian
    (``X^T X``: GPTQ, the weighted clipping search) comes from a linear's inputs or from the patches of a
    convolution with ``groups == 1``, whose AWQ scales are one per input channel; an algorithm whose
    ``grouped_hessian`` is true (AdaRound) also takes a grouped convolution's one Hessian per group."""
    needs = set(method.stats_needed)
    if not needs or is_linear_like(module):
        return None
    conv = isinstance(module, nn.modules.conv._ConvNd) and module.weight.dim() in (3, 4)
    if conv and needs <= {"hessian", "abs_mean"}:
        if module.groups == 1 or (needs == {"hessian"} and getattr(method, "grouped_hessian", False)):
            return None
        return f"a grouped {type(module).__name__} (groups={module.groups})"
    return f"a {type(module).__name__}"


def _act_fall_back(targets: list[Target]) -> list[Target]:
    """A convolution's input is quantized per tensor only: where the plan gives one per-token (or per-group)
    activations, its activations stay float (weights quantized as planned), said in one warning before any
    work starts."""
    out, moved = [], {}
    for t in targets:
        act = t.rule.act
        if act is None or act.spec.granularity == "tensor" or not isinstance(t.module, nn.modules.conv._ConvNd):
            out.append(t)
            continue
        moved.setdefault(act.name, []).append(t.name)
        out.append(dataclasses.replace(t, rule=dataclasses.replace(t.rule, act=None), act_from=act.name))
    for act, names in moved.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        log.warning("%d convolution(s) keep float activations: their input is quantized per tensor only, and the "
                    "plan asks for %s (weights are quantized as planned): %s", len(names), act, shown)
    return out


def rtn_instead(t: Target, keep_bias_correction: bool = False) -> Target:
    """``t`` with round to nearest in place of its algorithm (same format and activations), which it records;
    bias correction kept only where its input will still be observed (or, analytic, needs no observation)."""
    bc = t.rule.bias_correction if keep_bias_correction or t.rule.bias_correction == "analytic" else False
    rule = dataclasses.replace(t.rule, method=RTN(), bias_correction=bc)
    return dataclasses.replace(t, rule=rule, fallback_from=t.rule.method.name)


def _fall_back(targets: list[Target]) -> list[Target]:
    """Targets whose data-aware algorithm cannot take their layer get round-to-nearest (same format, activation
    and bias correction), said in one warning before any work starts."""
    out, moved = [], {}
    for t in targets:
        why = data_aware_misfit(t.module, t.rule.method)
        if why is None:
            out.append(t)
            continue
        moved.setdefault((t.rule.method.name, why), []).append(t.name)
        out.append(rtn_instead(t, keep_bias_correction=True))
    for (method, why), names in moved.items():
        shown = ", ".join(names[:4]) + (f" and {len(names) - 4} more" if len(names) > 4 else "")
        log.warning("%s cannot take %d layer(s) that are %s: they use round to nearest instead (%s)", method,
                    len(names), why, shown)
    return out


def select_targets(model: nn.Module, plan: QuantPlan, allow_none: bool = False) -> list[Target]:
    """The supported modules the plan quantizes, in module order; checks explicit names. InputError when it
    selects none, unless ``allow_none``."""
    modules = dict(model.named_modules())
    roles = module_roles(model)
    for r in plan.rules:
        exact = not r.pattern.startswith("re:") and not (_WILDCARDS & set(r.pattern))
        if exact and r.pattern in modules and not is_quantizable(modules[r.pattern]):
            raise InputError(
                f"rule {r.pattern!r} names a {type(modules[r.pattern]).__name__}; lowbit quantizes {SUPPORTED}"
            )
    targets = []
    for name, m in modules.items():
        if name and is_quantizable(m):
            rule = plan.rule_for(name, m, roles)
            if rule is not None:
                targets.append(Target(name, m, rule))
    odd = [n for n, m in modules.items() if unsupported_subclass(m) and plan.rule_for(n, m, roles) is not None]
    if odd:
        log.warning("%d module(s) subclass a supported layer but compute their own forward, so they stay in "
                    "float: %s", len(odd), ", ".join(f"{n} ({type(modules[n]).__name__})" for n in odd[:5]))
    for r in plan.rules:
        if r.weight is not None and not any(t.rule is r for t in targets):
            log.warning("rule %r matched no quantizable module", r.pattern)
    if not targets and not allow_none:
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


def check_finite_params(name: str, module: nn.Module) -> None:
    """Raise a clear InputError if any float parameter or buffer of ``module`` other than its weight (the bias,
    a norm's gain folded into it) holds NaN/Inf: it would pass into the quantized layer and every output."""
    for key, t in (*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)):
        if key != "weight" and t is not None and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise InputError(f"module {name!r}: {key} {tuple(t.shape)} holds {bad} NaN/Inf value(s)")


# where a layer's scales do not fit its scale storage, the storage they are moved to (the same element format)
_WIDER_SCALES = {"fp16": "fp32", "bf16": "fp32"}


def _fit_scale_storage(t: Target) -> Target:
    """``t`` itself, or ``t`` with fp32 scales where its weight's scales would underflow or overflow the
    rule's scale storage (fp16 holds 6.1e-5 .. 65504: weights near 1e-6 would round to all zeros at any
    width, weights near 1e7 saturate), with a warning naming the layer. Raises InputError when no wider
    storage exists (``e8m0`` outside 2^-127 .. 2^127)."""
    spec = t.rule.weight
    # checked on the weight's own ranges; a clipping search shrinks a range at most 2x (max_shrink 0.5), and a
    # scale it pushes below the smallest normal is clamped up to it: that tile's grid is then at most 2x coarser
    issue = scale_storage_issue(float_weight(t.module), spec)
    if issue is None:
        return t
    wider = _WIDER_SCALES.get(spec.scale_format)
    if wider is None:
        raise InputError(f"module {t.name!r}: {issue}; this format has no wider scale storage: quantize this layer "
                         f"with another spec or keep it in float")
    new = spec.with_(scale_format=wider)
    log.warning("module %r: %s; storing its scales as %s (%s instead of %s)", t.name, issue, wider, new.name,
                spec.name)
    return Target(t.name, t.module, dataclasses.replace(t.rule, weight=new))


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

"""Mixed-precision search: one format per layer group, chosen by measured sensitivity within a size budget.

``search(model, data, formats, budget)`` measures every quantizable layer under every candidate format
(:mod:`lowbit.mixed.sensitivity`), adds the errors per group of layers that share an input (they get one format,
as their kernels and calibration statistics are shared), and allocates exactly (:mod:`lowbit.mixed.allocate`).
The result is an ordinary :class:`~lowbit.plan.QuantPlan` (one rule per layer), saved as a YAML recipe that
``lowbit quantize --recipe`` runs, plus everything measured, for the report (:mod:`lowbit.mixed.report`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from lowbit.calibration.capture import batches as split_batches
from lowbit.errors import InputError
from lowbit.mixed import sensitivity as S
from lowbit.mixed.allocate import allocate, totals
from lowbit.nn.convert import float_weight, is_linear_like, to_quantized
from lowbit.plan import DEFAULT_SKIP, QuantPlan, Rule
from lowbit.spec import QuantSpec
from lowbit.targets import prepare

log = logging.getLogger(__name__)

_BUDGET = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*(bpw|bits?|b|kb|mb|gb|kib|mib|gib|s|ms|us)?\s*$", re.IGNORECASE)
_BYTES = {"b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
_SECONDS = {"s": 1.0, "ms": 1e-3, "us": 1e-6}


@dataclass(frozen=True)
class Budget:
    """A limit on the searched layers: their storage in average bits per weight (scales and zero points included)
    or bytes, or their summed time per call on this machine (:mod:`lowbit.mixed.latency`).
    ``Budget.parse("3.5bpw")``, ``Budget.parse("60MB")``, ``Budget.parse("4ms")``; a bare number is bits per
    weight."""

    kind: str  # "bpw", "bytes" or "seconds"
    value: float

    @classmethod
    def parse(cls, text: str | float) -> "Budget":
        if isinstance(text, (int, float)) and not isinstance(text, bool):
            text = str(text)
        m = _BUDGET.match(str(text))
        if not m or float(m.group(1)) <= 0:
            raise InputError(f"budget {text!r} is not a size or a time: give average bits per weight (3.5bpw), "
                             f"bytes (60MB, 48MiB, 123456B) or the searched layers' time per call (4ms, 800us)")
        unit = (m.group(2) or "bpw").lower()
        if unit in ("bpw", "bit", "bits"):
            return cls("bpw", float(m.group(1)))
        if unit in _SECONDS:
            return cls("seconds", float(m.group(1)) * _SECONDS[unit])
        return cls("bytes", float(m.group(1)) * _BYTES[unit])

    def limit(self, weights: int) -> float:
        """The budget in the allocation's unit: storage bits (for ``weights`` searched weights) or seconds."""
        return self.value * weights if self.kind == "bpw" else self.value * 8 if self.kind == "bytes" else self.value

    def __str__(self) -> str:
        if self.kind == "seconds":
            return f"{self.value * 1e3:g} ms per call"
        return f"{self.value:g} bits/weight" if self.kind == "bpw" else f"{self.value:,.0f} bytes"


@dataclass
class SearchResult:
    """What the search measured and chose.

    groups: layer groups (one format each). specs: candidate format names. method: the algorithm, as a rule gives
    it. measure: the sensitivity the allocation minimized. cost / bits: per group and candidate, the predicted
    error and storage bits. weights: per group, its number of weights. choice: per group, the chosen candidate.
    measures: every sensitivity computed, per group and candidate (``{"proxy": [[...]], ...}``). layer_costs: per
    layer and candidate, the allocation's measure (for the report). front: ``(bits per weight, predicted error)``
    of the optimal allocation at other budgets. seconds: time per stage. latency: per group and candidate, seconds
    per call on ``latency_tokens`` input rows (measured for a latency budget, else empty).
    """

    groups: list[list[str]]
    specs: list[str]
    method: Any
    measure: str
    cost: list[list[float]]
    bits: list[list[int]]
    weights: list[int]
    choice: list[int]
    budget: Budget
    skip: tuple[str, ...] = DEFAULT_SKIP
    measures: dict[str, list[list[float]]] = field(default_factory=dict)
    layer_costs: dict[str, list[float]] = field(default_factory=dict)
    front: list[tuple[float, float]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    latency: list[list[float]] = field(default_factory=list)
    latency_tokens: int = 0

    @property
    def seconds_per_call(self) -> float | None:
        """The chosen allocation's summed time per call (None without a latency table)."""
        return totals(self.choice, self.cost, self.latency)[1] if self.latency else None

    def sizes(self, budget: Budget) -> list[list[float]]:
        """What ``budget`` limits, per group and candidate: storage bits, or seconds per call."""
        if budget.kind != "seconds":
            return self.bits
        if not self.latency:
            raise InputError("this search measured no latency table; search again with a time budget (4ms)")
        return self.latency

    @property
    def bits_per_weight(self) -> float:
        return totals(self.choice, self.cost, self.bits)[1] / sum(self.weights)

    @property
    def predicted(self) -> float:
        return totals(self.choice, self.cost, self.bits)[0]

    def layer_specs(self) -> dict[str, str]:
        """Every searched layer's chosen format, in model order."""
        return {n: self.specs[k] for g, k in zip(self.groups, self.choice) for n in g}

    def plan(self) -> QuantPlan:
        """The allocation as a plan: one rule per layer (exact names), the search's skip patterns."""
        rules = tuple(Rule(n, s, self.method) for n, s in self.layer_specs().items())
        return QuantPlan(rules, self.skip)

    def mix(self) -> dict[str, tuple[int, int]]:
        """Per chosen format, in candidate order: ``(layers, weights)``."""
        out: dict[str, tuple[int, int]] = {}
        for g, k, w in zip(self.groups, self.choice, self.weights):
            layers, weights = out.get(self.specs[k], (0, 0))
            out[self.specs[k]] = (layers + len(g), weights + w)
        return {s: out[s] for s in self.specs if s in out}

    def recipe(self) -> str:
        """The plan as a YAML recipe, with a header saying what was searched."""
        head = [f"# lowbit search: {len(self.groups)} layer groups, budget {self.budget}, sensitivity "
                f"'{self.measure}', method {_method_name(self.method)}",
                f"# chosen: {self.bits_per_weight:.3f} bits/weight (scales and zero points included); "
                + ", ".join(f"{s}: {c} layers" for s, (c, _) in self.mix().items()),
                f"# predicted error (sum of the groups' {self.measure}): {self.predicted:.6g}"]
        return "\n".join(head) + "\n" + self.plan().to_yaml()

    def reallocate(self, budget: Budget | str | float) -> "SearchResult":
        """The same measurements allocated within another budget (no model needed): a new result."""
        budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
        sizes = self.sizes(budget)
        _check_smallest(budget, sum(min(row) for row in sizes), sum(self.weights))
        return dataclasses.replace(self, choice=allocate(self.cost, sizes, budget.limit(sum(self.weights))),
                                   budget=budget)

    def to_dict(self) -> dict[str, Any]:
        method = self.method if isinstance(self.method, (str, dict)) else _method_name(self.method)
        return {"groups": self.groups, "specs": self.specs, "method": method, "measure": self.measure,
                "cost": self.cost, "bits": self.bits, "weights": self.weights, "choice": self.choice,
                "budget": {"kind": self.budget.kind, "value": self.budget.value}, "skip": list(self.skip),
                "measures": self.measures, "layer_costs": self.layer_costs,
                "front": [list(p) for p in self.front], "seconds": self.seconds, "calibration": self.calibration,
                "latency": self.latency, "latency_tokens": self.latency_tokens,
                "bits_per_weight": self.bits_per_weight, "predicted": self.predicted}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SearchResult":
        try:
            return cls([list(g) for g in d["groups"]], list(d["specs"]), d["method"], d["measure"], d["cost"],
                       d["bits"], d["weights"], d["choice"], Budget(d["budget"]["kind"], float(d["budget"]["value"])),
                       tuple(d["skip"]), d.get("measures", {}), d.get("layer_costs", {}),
                       [tuple(p) for p in d.get("front", [])], d.get("seconds", {}), d.get("calibration", {}),
                       d.get("latency", []), int(d.get("latency_tokens", 0)))
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a lowbit search record: {e!r}") from None

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def search(
    model: nn.Module,
    data: Any,
    formats: Sequence[str | QuantSpec],
    budget: Budget | str | float,
    method: Any = "rtn",
    measure: str = "fisher",
    skip: Sequence[str] = DEFAULT_SKIP,
    heldout: int = 2,
    gradient_samples: int = 4,
    hutchinson_samples: int = 4,
    measures: Sequence[str] = (),
    front_points: int = 24,
    latency_tokens: int = 1,
    progress: bool = True,
) -> SearchResult:
    """Choose a format per layer group of ``model`` within ``budget``, minimizing the summed ``measure``.

    Args:
        data: calibration batches (as ``quantize`` takes them). The last ``heldout`` samples (rows of the batch
            tensors; whole batches for batches of other kinds) are kept for the ``kl`` measure; the others give the
            input statistics, and the first ``gradient_samples`` of them, one at a time, the gradients of ``fisher``
            and ``hutchinson`` (whose second derivatives take several times the memory of a forward pass).
        hutchinson_samples: Rademacher vectors per gradient sample.
        formats: candidate format names or specs (at least two).
        budget: :class:`Budget` or its text: the searched layers' storage (``"3.5bpw"``, ``"60MB"``) or their summed
            time per call on this machine with lowbit's kernels (``"4ms"``; :mod:`lowbit.mixed.latency`).
        method: the algorithm every candidate is quantized with (a name or a mapping, as in a recipe rule).
        measure: the sensitivity minimized: one of :data:`~lowbit.mixed.sensitivity.MEASURES`.
        measures: further measures to compute and keep (for the report's comparison), besides ``measure``.
        front_points: budgets at which the optimal allocation is also computed (the predicted Pareto front).
        latency_tokens: input rows per timed call, for a time budget (1: a decode step).
    Raises:
        InputError: fewer than two formats, an unknown measure, a budget no allocation meets, a format that does
            not fit a layer, too little data.
    """
    specs = _specs(formats)
    if measure not in S.MEASURES:
        raise InputError(f"unknown sensitivity measure {measure!r}; choose from {', '.join(S.MEASURES)}")
    wanted = list(dict.fromkeys([measure, *measures]))
    for m in wanted:
        if m not in S.MEASURES:
            raise InputError(f"unknown sensitivity measure {m!r}; choose from {', '.join(S.MEASURES)}")
    budget = budget if isinstance(budget, Budget) else Budget.parse(budget)
    seconds: dict[str, float] = {}
    t0 = time.perf_counter()
    names, methods = _targets(model, specs, method, skip)
    rule = Rule("*", specs[0], method)
    modules = dict(model.named_modules())
    _check_budget(budget, [modules[n] for n in names], specs)  # before minutes of measuring
    calib, held = _hold_out(list(split_batches(data)), heldout)
    if "kl" in wanted and not held:
        raise InputError("the 'kl' measure needs held-out samples (heldout >= 1)")
    grad_rows = _rows(calib, gradient_samples)
    groups = S.input_groups(model, calib[0], names)
    log.info("mixed-precision search: %d layers in %d groups, %d candidate formats, measure %s",
             len(names), len(groups), len(specs), measure)
    stats = S.input_statistics(model, names, rule, calib, progress)
    seconds["statistics"] = time.perf_counter() - t0

    t = time.perf_counter()
    cands = S.candidates(model, names, specs, method, stats, progress, per_layer=methods)
    del stats  # the candidates hold their errors; X^T X is no longer needed
    seconds["candidates"] = time.perf_counter() - t
    diag = {k: c.row_error for k, c in cands.items()}

    per_layer: dict[str, dict[tuple[str, str], float]] = {}
    if "proxy" in wanted:
        per_layer["proxy"] = {k: float(v.sum()) for k, v in diag.items()}
    if "fisher" in wanted:
        t = time.perf_counter()
        G = S.output_fisher(model, names, grad_rows, progress=progress)
        per_layer["fisher"] = {(n, s): 0.5 * float((G[n] * v).sum()) for (n, s), v in diag.items()}
        seconds["fisher"] = time.perf_counter() - t
    if "hutchinson" in wanted:
        t = time.perf_counter()
        tr = S.hutchinson_traces(model, names, grad_rows, hutchinson_samples, progress=progress)
        per_layer["hutchinson"] = {(n, s): tr[n] * c.sq_error for (n, s), c in cands.items()}
        seconds["hutchinson"] = time.perf_counter() - t
    group_measures: dict[str, list[list[float]]] = {}
    for m, vals in per_layer.items():
        group_measures[m] = [[sum(vals[(n, s.name)] for n in g) for s in specs] for g in groups]
    if "kl" in wanted:
        t = time.perf_counter()
        kl = S.direct_kl(model, groups, specs, cands, held, progress)
        group_measures["kl"] = [[kl[(i, s.name)] for s in specs] for i in range(len(groups))]
        seconds["kl"] = time.perf_counter() - t

    cost = group_measures[measure]
    bits = [[sum(cands[(n, s.name)].bits for n in g) for s in specs] for g in groups]
    n_weights = [sum(float_weight(modules[n]).numel() for n in g) for g in groups]
    latency: list[list[float]] = []
    if budget.kind == "seconds":
        from lowbit.mixed.latency import group_latency, latency_table

        t = time.perf_counter()
        table = latency_table({k: c.module for k, c in cands.items()}, tokens=latency_tokens)
        latency = group_latency(groups, [s.name for s in specs], table)
        seconds["latency"] = time.perf_counter() - t
    t = time.perf_counter()
    sizes = latency or bits
    _check_smallest(budget, sum(min(row) for row in sizes), sum(n_weights))
    choice = allocate(cost, sizes, budget.limit(sum(n_weights)))
    front = _front(cost, bits, sum(n_weights), front_points)
    seconds["allocation"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - t0
    layer_costs = {n: [per_layer[measure][(n, s.name)] for s in specs] for n in names} if measure in per_layer \
        else {}
    result = SearchResult(groups, [s.name for s in specs], _method_value(rule), measure, cost, bits, n_weights,
                          choice, budget, tuple(skip), group_measures, layer_costs, front, seconds,
                          {"batches": len(calib), "heldout": _count(held), "gradient_samples": _count(grad_rows)},
                          latency, latency_tokens if latency else 0)
    if latency:
        result.calibration["threads"] = torch.get_num_threads()
    log.info("search: %.3f bits/weight chosen within %s in %.0f s", result.bits_per_weight, budget, seconds["total"])
    return result


def _check_smallest(budget: Budget, smallest: float, weights: int) -> None:
    """InputError when ``budget`` is below ``smallest``, the least any allocation takes (in the budget's unit)."""
    if budget.limit(weights) < smallest:
        shown = f"{smallest * 1e3:.3f} ms per call" if budget.kind == "seconds" else \
            f"{smallest / weights:.3f} bits/weight ({smallest / 8:,.0f} bytes)"
        raise InputError(f"budget {budget} is below the smallest allocation of these formats: {shown}; add a "
                         f"smaller or faster format or raise the budget")


def _check_budget(budget: Budget, modules: list[nn.Module], specs: list[QuantSpec]) -> None:
    """InputError when a size ``budget`` is below the smallest allocation of round-to-nearest storage (an algorithm
    can only add to it: AWQ's input scales). Time budgets are checked once the layers are timed."""
    from lowbit.formats import quantize as rtn

    if budget.kind == "seconds":
        convs = [type(m).__name__ for m in modules if not is_linear_like(m)]
        if convs:
            raise InputError(f"a time budget times linear layers; this model's searched layers include a {convs[0]} "
                             f"(give a bits-per-weight or bytes budget)")
        return
    smallest = sum(min(to_quantized(m, rtn(float_weight(m), s)).storage_bytes() for s in specs) for m in modules) * 8
    _check_smallest(budget, smallest, sum(float_weight(m).numel() for m in modules))


def _hold_out(batches: list[Any], n: int) -> tuple[list[Any], list[Any]]:
    """``(the rest, the last n samples)``: rows of tensor batches (as one batch), else whole batches."""
    if n < 0:
        raise InputError(f"heldout must be >= 0, got {n}")
    if all(isinstance(b, torch.Tensor) for b in batches) and batches:
        rows = sum(b.shape[0] for b in batches)
        if rows < n + 1:
            raise InputError(f"the search needs more than {n} calibration samples ({n} held out for the KL measure), "
                             f"got {rows}")
        flat = torch.cat(batches) if n else None
        rest, k = [], rows - n
        for b in batches:  # the batches as they were, cut where the held-out samples start
            if k <= 0:
                break
            rest.append(b[:k])
            k -= b.shape[0]
        return rest, ([flat[rows - n:]] if n else [])
    if len(batches) < n + 1:
        raise InputError(f"the search needs more than {n} calibration batches ({n} held out for the KL measure), "
                         f"got {len(batches)}")
    return (batches[:-n], batches[-n:]) if n else (batches, [])


def _rows(batches: list[Any], n: int) -> list[Any]:
    """The first ``n`` samples one at a time (rows of tensor batches), else the first ``n`` batches."""
    out: list[Any] = []
    for b in batches:
        parts = list(b.split(1)) if isinstance(b, torch.Tensor) else [b]
        out.extend(parts[: n - len(out)])
        if len(out) >= n:
            break
    return out


def _count(batches: list[Any]) -> int:
    return sum(b.shape[0] if isinstance(b, torch.Tensor) else 1 for b in batches)


def _specs(formats: Sequence[str | QuantSpec]) -> list[QuantSpec]:
    if isinstance(formats, str):
        formats = [f for f in formats.split(",") if f.strip()]
    specs = [f if isinstance(f, QuantSpec) else QuantSpec.parse(str(f).strip()) for f in formats]
    if len({s.name for s in specs}) < 2:
        raise InputError(f"a search needs at least two distinct candidate formats, got {[s.name for s in specs]}")
    return list({s.name: s for s in specs}.values())


def _targets(model: nn.Module, specs: list[QuantSpec], method: Any, skip: Sequence[str]
             ) -> tuple[list[str], dict[str, Any]]:
    """The layers a uniform plan of each candidate quantizes (the same for all of them), and the algorithm each
    takes: ``method``, or round to nearest where ``quantize`` would fall back to it (it says which)."""
    names: list[str] | None = None
    methods: dict[str, Any] = {}
    for spec in specs:
        targets = prepare(model, QuantPlan.uniform(spec, method, skip=tuple(skip)))
        if any(t.rule.act is not None for t in targets):
            raise InputError("the search chooses weight formats; activation quantization is not searched")
        these = [t.name for t in targets]
        if names is not None and these != names:
            raise InputError(f"format {spec.name} applies to other layers than {specs[0].name}")
        names = these
        fallback = [t.name for t in targets if t.fallback_from is not None]
        if fallback:
            log.warning("%d layer(s) take round to nearest instead of the method under %s (e.g. %s)", len(fallback),
                        spec.name, fallback[0])
        methods = {t.name: t.rule.method for t in targets}
    return names or [], methods


def _front(cost: list[list[float]], bits: list[list[int]], weights: int, points: int) -> list[tuple[float, float]]:
    """The optimal allocation's ``(bits per weight, predicted error)`` at ``points`` budgets from the smallest
    allocation to the cheapest one's size."""
    lo = sum(min(b) for b in bits)
    hi = sum(b[min(range(len(c)), key=lambda k: (c[k], b[k]))] for c, b in zip(cost, bits))
    out = []
    for i in range(max(points, 2)):
        limit = lo + (hi - lo) * i / (max(points, 2) - 1)
        choice = allocate(cost, bits, limit)
        c, s = totals(choice, cost, bits)
        if not out or s != out[-1][0] * weights:
            out.append((s / weights, c))
    return out


def _method_value(rule: Rule) -> Any:
    d = rule.to_dict()
    return d.get("method", "rtn")


def _method_name(method: Any) -> str:
    if isinstance(method, dict):
        return str(method.get("name", "?"))
    return str(getattr(method, "name", method))


def parse_formats(text: str) -> list[QuantSpec]:
    """``"int3-g64-asym,int4-g64-asym"`` -> the specs (InputError names a bad one)."""
    return _specs([f for f in text.split(",") if f.strip()])


def describe(result: SearchResult) -> str:
    """A few lines: the chosen mix and its predicted error."""
    total = sum(result.weights)
    took = f", {result.seconds_per_call * 1e3:.3f} ms per call" if result.latency else ""
    lines = [f"{result.bits_per_weight:.3f} bits/weight{took} within {result.budget} (sensitivity "
             f"'{result.measure}', predicted {result.predicted:.6g}):"]
    for s, (layers, weights) in result.mix().items():
        lines.append(f"  {s}: {layers} layers, {weights / total:.1%} of the weights")
    lines.append("  time: " + ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    return "\n".join(lines)



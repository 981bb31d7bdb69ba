"""Bit allocation: one format per layer group, the smallest predicted error within a size budget.

Given, for every group ``i`` (layers that must share a format: a Llama layer's q/k/v, its gate/up) and
candidate format ``k``, a predicted error ``cost[i][k]`` and a size ``size[i][k]`` (storage bits, scales and zero
points included), :func:`allocate` picks one ``k_i`` per group minimizing ``sum_i cost[i][k_i]`` subject to
``sum_i size[i][k_i] <= budget``: a multiple-choice knapsack, solved exactly as a 0/1 integer program by
scipy's ``milp`` (HiGHS, relative gap 0). The additive assumption is that the model's error is the sum of the
groups' errors, each measured with every other layer in float (HAWQ-V2/V3, Dong et al. 2019/2021, make the
same assumption; the benchmark measures how well it holds).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np

from lowbit.errors import InputError
from lowbit.quiet import quiet_fd


def allocate(cost: Sequence[Sequence[float]], size: Sequence[Sequence[float]], budget: float) -> list[int]:
    """The choice ``k_i`` per group minimizing the summed cost within ``budget`` (exact).

    Args:
        cost: ``cost[i][k]``, finite, per group and candidate.
        size: ``size[i][k]``, finite and >= 0, same shape; ``budget`` is in the same unit.
    Returns:
        one index per group.
    Raises:
        InputError: ragged or non-finite inputs, or a budget below the smallest possible size.
    """
    c, s = _check(cost, size)
    smallest = float(s.min(1).sum())
    if budget < smallest:
        raise InputError(f"the budget ({budget:,.0f}) is below the smallest size any allocation has ({smallest:,.0f})")
    if float(s[np.arange(len(s)), c.argmin(1)].sum()) <= budget:  # the budget does not bind
        return _cheapest(c, s)
    return _milp(c, s, budget)


def brute_force(cost: Sequence[Sequence[float]], size: Sequence[Sequence[float]], budget: float) -> list[int] | None:
    """Every allocation tried (for tests on small problems): the best within ``budget``, or None if none fits."""
    c, s = _check(cost, size)
    best, best_key = None, None
    for ks in itertools.product(*(range(len(r)) for r in c)):
        total = sum(s[i][k] for i, k in enumerate(ks))
        if total > budget:
            continue
        key = (sum(c[i][k] for i, k in enumerate(ks)), total)
        if best_key is None or key < best_key:
            best, best_key = list(ks), key
    return best


def totals(choice: Sequence[int], cost: Sequence[Sequence[float]], size: Sequence[Sequence[float]]
           ) -> tuple[float, float]:
    """``(summed cost, summed size)`` of an allocation."""
    return (float(sum(cost[i][k] for i, k in enumerate(choice))), float(sum(size[i][k] for i, k in enumerate(choice))))


def _check(cost, size) -> tuple[np.ndarray, np.ndarray]:
    if len(cost) == 0 or len(cost) != len(size):
        raise InputError(f"allocation needs one cost row and one size row per group; got {len(cost)} and {len(size)}")
    for i, (cr, sr) in enumerate(zip(cost, size)):
        if len(cr) == 0 or len(cr) != len(sr):
            raise InputError(f"group {i}: {len(cr)} cost(s) and {len(sr)} size(s); they must match and be non-empty")
    width = max(len(r) for r in cost)
    c = np.full((len(cost), width), np.inf)
    s = np.full((len(cost), width), np.inf)
    for i, (cr, sr) in enumerate(zip(cost, size)):
        c[i, :len(cr)], s[i, :len(sr)] = cr, sr
        if not (all(math.isfinite(float(v)) for v in cr) and all(math.isfinite(float(v)) and v >= 0 for v in sr)):
            raise InputError(f"group {i}: costs must be finite and sizes finite and >= 0; got {list(cr)}, {list(sr)}")
    return c, s


def _cheapest(c: np.ndarray, s: np.ndarray) -> list[int]:
    """Per group the lowest cost, the smaller size among equal costs."""
    return [int(np.lexsort((s[i], c[i]))[0]) for i in range(len(c))]


def _milp(c: np.ndarray, s: np.ndarray, budget: float) -> list[int]:
    from scipy.optimize import Bounds, LinearConstraint, milp

    n, width = c.shape
    valid = np.isfinite(c).ravel()
    idx = np.flatnonzero(valid)  # variables: (group, candidate) pairs that exist
    group = idx // width
    cv, sv = c.ravel()[idx], s.ravel()[idx]
    one = np.zeros((n, len(idx)))
    one[group, np.arange(len(idx))] = 1.0
    scale = float(sv.max()) or 1.0  # sizes relative to the largest (bits or seconds), so tolerances mean the same
    limit = budget / scale
    for _ in range(4):
        with quiet_fd(1):  # HiGHS prints some internal messages there whatever its options
            res = milp(cv, integrality=np.ones(len(idx)), bounds=Bounds(0, 1),
                       constraints=[LinearConstraint(one, 1, 1),
                                    LinearConstraint((sv / scale)[None, :], -np.inf, limit)],
                       options={"mip_rel_gap": 0.0, "presolve": True})
        if res.x is None:
            raise InputError(f"the allocation problem has no solution within the budget ({res.message})")
        choice = [0] * n
        for j in np.flatnonzero(res.x > 0.5):
            choice[group[j]] = int(idx[j] % width)
        total = float(sum(s[i, k] for i, k in enumerate(choice)))
        if total <= budget:
            return choice
        limit -= (total - budget) / scale  # the solver's tolerance let it through: tighten and solve again
    raise InputError("the integer program kept exceeding the budget by its tolerance; widen the budget slightly")


"""The exact allocator against brute force on small synthetic problems."""

from __future__ import annotations

import random

import pytest

from lowbit.errors import InputError
from lowbit.mixed.allocate import allocate, brute_force, totals


def _problem(rng: random.Random, groups: int, width: int):
    cost, size = [], []
    for _ in range(groups):
        k = rng.randint(1, width)
        sizes = sorted(rng.randint(1, 40) for _ in range(k))
        # fewer bits usually cost more error, with noise so that some candidates are dominated
        cost.append([rng.uniform(0, 5) / (s ** rng.uniform(0.5, 2)) + rng.uniform(0, 0.2) for s in sizes])
        size.append([s * rng.choice([1, 8, 64]) for s in sizes])
    return cost, size


@pytest.mark.parametrize("seed", range(40))
def test_the_allocation_is_optimal_and_within_budget(seed):
    rng = random.Random(seed)
    cost, size = _problem(rng, rng.randint(1, 6), 4)
    lo = sum(min(s) for s in size)
    hi = sum(max(s) for s in size)
    for budget in (lo, lo + (hi - lo) * rng.random(), (lo + hi) / 2, hi, hi * 2):
        choice = allocate(cost, size, budget)
        best = brute_force(cost, size, budget)
        c, s = totals(choice, cost, size)
        assert s <= budget  # the budget is never exceeded
        assert c == pytest.approx(totals(best, cost, size)[0], rel=1e-9, abs=1e-12)  # and nothing fits better


def test_allocation_errors():
    with pytest.raises(InputError, match="below the smallest"):
        allocate([[1.0, 2.0]], [[10, 5]], 4)
    with pytest.raises(InputError, match="must match"):
        allocate([[1.0, 2.0]], [[10]], 40)
    with pytest.raises(InputError, match="finite"):
        allocate([[float("nan"), 2.0]], [[10, 5]], 40)
    with pytest.raises(InputError, match="one cost row"):
        allocate([], [], 40)
    assert brute_force([[1.0]], [[10]], 5) is None


def test_a_budget_that_does_not_bind_takes_every_groups_cheapest_candidate():
    cost = [[3.0, 1.0, 1.0], [0.5, 2.0, 9.0]]
    size = [[1, 4, 2], [8, 4, 1]]
    assert allocate(cost, size, 100) == [2, 0]  # equal costs: the smaller


@pytest.mark.parametrize("seed", range(20))
def test_sizes_in_seconds_are_allocated_exactly_too(seed):
    rng = random.Random(seed)
    cost, size = _problem(rng, rng.randint(2, 6), 4)
    size = [[s * 1e-7 for s in row] for row in size]  # a latency table: microseconds per layer
    lo, hi = sum(min(s) for s in size), sum(max(s) for s in size)
    budget = lo + (hi - lo) * rng.random()
    choice = allocate(cost, size, budget)
    assert totals(choice, cost, size)[1] <= budget
    assert totals(choice, cost, size)[0] == pytest.approx(totals(brute_force(cost, size, budget), cost, size)[0],
                                                          rel=1e-9, abs=1e-12)

"""Mixed precision: per-layer sensitivity, exact bit allocation under a size budget, and the report.

    from lowbit.mixed import search
    result = search(model, calib, ["int3-g64-asym", "int4-g64-asym", "int8"], "3.5bpw", method="gptq")
    result.plan()          # a QuantPlan; result.recipe() is its YAML
"""

from lowbit.mixed.allocate import allocate
from lowbit.mixed.search import Budget, SearchResult, describe, search

__all__ = ["search", "Budget", "SearchResult", "allocate", "describe"]

"""Algorithms: how quantized values are chosen. One file per method, a pure function at its core.

Each method is a frozen config class that follows the :class:`~lowbit.algorithms.config.Algorithm` protocol
(``name``, ``stats_needed``, ``run(W, stats, spec, ranges=None) -> WeightResult``, ``to_dict()``), registered
in :data:`ALGORITHMS` under the name users write in recipes and on the command line. Names joined by ``+``
are the chains of :data:`CHAINS` (``"awq+gptq"``: AWQ's scaling and clipping, then GPTQ rounds within them).
"""

from __future__ import annotations

from typing import Any

from lowbit.algorithms.adaround import AdaRound, adaround
from lowbit.algorithms.awq import AWQ, awq, awq_scales
from lowbit.algorithms.config import Algorithm, WeightResult
from lowbit.algorithms.gptq import GPTQ, gptq
from lowbit.algorithms.rtn import RTN, rtn
from lowbit.errors import InputError

# name -> config class
ALGORITHMS: dict[str, type] = {
    "rtn": RTN,
    "gptq": GPTQ,
    "awq": AWQ,
    "adaround": AdaRound,
}

# "a+b" names -> the composed config they stand for
CHAINS: dict[str, Any] = {
    "awq+rtn": AWQ(),
    "awq+gptq": AWQ(then=GPTQ()),
}


def make_algorithm(name_or_dict: str | dict[str, Any] | Any) -> Any:
    """A config from a name (``"rtn"``, or a chain such as ``"awq+gptq"``), a dict with ``name``
    (``{"name": "rtn", "clip_search": True}``), or a config object (returned as is).

    Raises:
        InputError: unknown name or chain, missing name, or bad settings.
    """
    if isinstance(name_or_dict, tuple(ALGORITHMS.values())):
        return name_or_dict
    if isinstance(name_or_dict, str) and "+" in name_or_dict:
        key = "+".join(p.strip().lower() for p in name_or_dict.split("+"))
        if key not in CHAINS:
            raise InputError(f"unknown algorithm chain {name_or_dict!r}; supported chains: {', '.join(CHAINS)}")
        return CHAINS[key]
    if isinstance(name_or_dict, str):
        return _config_class(name_or_dict)()
    if isinstance(name_or_dict, dict):
        if "name" not in name_or_dict:
            raise InputError(f"algorithm settings {name_or_dict!r} need a 'name' (one of {', '.join(ALGORITHMS)})")
        return _config_class(name_or_dict["name"]).from_dict(name_or_dict)
    raise InputError(f"an algorithm is a name, a dict with 'name', or a config object; got {name_or_dict!r}")


def _config_class(name: Any) -> type:
    key = name.strip().lower() if isinstance(name, str) else name
    if key not in ALGORITHMS:
        raise InputError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)} "
                         f"(chains: {', '.join(CHAINS)})")
    return ALGORITHMS[key]


__all__ = ["AdaRound", "adaround", "Algorithm", "ALGORITHMS", "AWQ", "awq", "awq_scales", "CHAINS", "GPTQ", "gptq", "make_algorithm", "RTN", "rtn",
           "WeightResult"]

"""Algorithms: how quantized values are chosen. One file per method, a pure function at its core.

Each method has a frozen config class (``name``, ``needs_data``, ``to_dict()``, ``from_dict()``) registered
in :data:`ALGORITHMS` under the name users write in recipes and on the command line.
"""

from __future__ import annotations

from typing import Any

from lowbit.algorithms.clip_search import mse_clip_search
from lowbit.algorithms.gptq import GPTQ, gptq
from lowbit.algorithms.rtn import RTN, rtn
from lowbit.errors import InputError

# name -> config class
ALGORITHMS: dict[str, type] = {
    "rtn": RTN,
    "gptq": GPTQ,
}


def make_algorithm(name_or_dict: str | dict[str, Any] | Any) -> Any:
    """A config from a name (``"rtn"``), a dict with ``name`` (``{"name": "rtn", "clip_search": True}``),
    or a config object (returned as is).

    Raises:
        InputError: unknown name, missing name, or bad settings.
    """
    if isinstance(name_or_dict, tuple(ALGORITHMS.values())):
        return name_or_dict
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
        raise InputError(f"unknown algorithm {name!r}; known: {', '.join(ALGORITHMS)}")
    return ALGORITHMS[key]


__all__ = ["ALGORITHMS", "GPTQ", "gptq", "RTN", "make_algorithm", "mse_clip_search", "rtn"]

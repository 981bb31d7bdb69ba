"""Observers: streaming statistics that set a quantization range from calibration data.

``update(x)`` any number of times, then ``compute()`` -> an immutable :class:`Range` ``(lo, hi)`` shaped
like the spec's scale grid. :data:`OBSERVERS` maps the names used in recipes (``ActivationQuant.observer``)
to the classes.
"""

from __future__ import annotations

import inspect
from typing import Any

from lowbit.errors import InputError
from lowbit.observers.base import Observer, Range
from lowbit.observers.histogram import HistogramObserver
from lowbit.observers.minmax import MinMaxObserver
from lowbit.observers.mse import MSEObserver
from lowbit.observers.percentile import PercentileObserver
from lowbit.spec import QuantSpec

OBSERVERS: dict[str, type[Observer]] = {
    "minmax": MinMaxObserver,
    "percentile": PercentileObserver,
    "mse": MSEObserver,
    "histogram": HistogramObserver,
}


def make_observer(name: str, spec: QuantSpec, **settings: Any) -> Observer:
    """A new observer by registry name, e.g. ``make_observer("percentile", spec, percentile=99.9)``.

    Raises:
        InputError: unknown name, or settings the observer does not take.
    """
    if name not in OBSERVERS:
        raise InputError(f"unknown observer {name!r}; known: {', '.join(OBSERVERS)}")
    cls = OBSERVERS[name]
    known = [p for p in inspect.signature(cls).parameters if p != "spec"]
    unknown = sorted(set(settings) - set(known))
    if unknown:
        raise InputError(f"observer {name!r} has no setting(s) {unknown}; known: {', '.join(known) or 'none'}")
    return cls(spec, **settings)


__all__ = [
    "OBSERVERS",
    "HistogramObserver",
    "MSEObserver",
    "MinMaxObserver",
    "Observer",
    "PercentileObserver",
    "Range",
    "make_observer",
]

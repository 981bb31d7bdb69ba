"""What every algorithm shares: the :class:`Algorithm` protocol, its result, and the config dict round trip.

An algorithm is a frozen config dataclass (``lowbit.algorithms.ALGORITHMS`` names them for recipes) whose
``run(W, stats, spec)`` turns one float weight, the statistics of that layer's input it asked for, and the
target format into a :class:`WeightResult`. ``lowbit.quantize`` reads ``stats_needed`` to decide what to
observe and then calls ``run``: it never switches on an algorithm's name, so a new algorithm needs no edit
there. An algorithm may hand its (transformed) weight to another one (AWQ's ``then``) through ``ranges``:
fixed per-tile ranges the follower quantizes within.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Mapping, Protocol, runtime_checkable

import torch

from lowbit.errors import InputError
from lowbit.formats import QuantizedTensor
from lowbit.spec import QuantSpec

# the input statistics an algorithm may ask for (``lowbit.calibration.Request`` computes them):
#   hessian   (cols, cols) float32: X^T X / n over the calibration tokens
#   abs_mean  (cols,) float32: mean |x| per input feature
STATS = ("hessian", "abs_mean")


@dataclass(frozen=True, eq=False)
class WeightResult:
    """One layer's quantized weight, and optionally a per-input-feature scale applied before it.

    ``q``: the quantized weight, lowbit layout ``(out, in)``. ``input_scale``: None, or float32 ``(in,)``
    positive; the layer computes ``(x * input_scale) @ dequantize(q).T`` (AWQ's ``1 / s``).
    """

    q: QuantizedTensor
    input_scale: torch.Tensor | None = None


@runtime_checkable
class Algorithm(Protocol):
    """How quantized values are chosen for one weight (see the module docstring)."""

    name: ClassVar[str]

    @property
    def stats_needed(self) -> tuple[str, ...]:
        """The input statistics (names from :data:`STATS`) ``run`` reads; empty: it needs no data."""

    def run(self, W: torch.Tensor, stats: Mapping[str, torch.Tensor], spec: QuantSpec,
            ranges: tuple[torch.Tensor, torch.Tensor] | None = None) -> WeightResult:
        """Quantize ``W`` ``(rows, cols)`` to ``spec``; ``ranges``: fixed ``(lo, hi)`` per tile, ``(gr, gc)``."""

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., settings ...}``, as recipes write it."""


def stat(stats: Mapping[str, torch.Tensor], key: str, who: str) -> torch.Tensor:
    """``stats[key]``, or an InputError saying that ``who`` needs calibration data for it."""
    value = stats.get(key)
    if value is None:
        raise InputError(f"{who} needs the {key} of the layer's inputs from calibration data; pass data to quantize()")
    return value


class AlgorithmConfig:
    """Mixin for frozen dataclass configs: ``name`` plus ``to_dict()`` / ``from_dict()``."""

    name: ClassVar[str]

    @property
    def needs_data(self) -> bool:
        """True when ``run`` reads statistics of calibration data."""
        return bool(self.stats_needed)  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Any:
        """Build from ``{"name": ..., setting: value, ...}``; unknown settings raise InputError."""
        d = dict(d)
        name = d.pop("name", cls.name)
        if name != cls.name:
            raise InputError(f"{cls.__name__}.from_dict got name {name!r}, expected {cls.name!r}")
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise InputError(f"{cls.name}: unknown setting(s) {unknown}; known: {', '.join(known)}")
        return cls(**d)

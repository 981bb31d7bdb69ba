"""The dict round trip every algorithm config shares (recipes and manifests store configs as dicts)."""

from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, ClassVar

from lowbit.errors import InputError


class AlgorithmConfig:
    """Mixin for frozen dataclass configs: ``name`` plus ``to_dict()`` / ``from_dict()``."""

    name: ClassVar[str]

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

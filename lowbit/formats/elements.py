"""Element formats: how one code maps to one real value, before scaling.

Integers are affine (``(q - zero_point) * scale``) and live in ``integer.py``. Every other format is a
small table of levels indexed by the code:

* FP8 E4M3 / E5M2: the code is the bit pattern of a ``torch.float8_*`` value (256 codes); encoding uses
  torch's round-to-nearest-even cast after saturating to the largest finite value.
* FP4 E2M1 (OCP MX spec): sign bit + 3 bits, magnitudes ``0, 0.5, 1, 1.5, 2, 3, 4, 6``.
* NF4 (Dettmers et al., QLoRA, 2023, Appendix E): 16 levels at quantiles of N(0, 1), rescaled to [-1, 1],
  with an exact zero. Computed here from that construction; a test checks the published table.
* Ternary: ``{-1, 0, +1}`` (BitNet b1.58's absmean scaling is the default range, see ``qtensor.py``).

Nearest-level encoding snaps each value to the closest level; a value exactly halfway goes to the level
closer to minus infinity.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

_FP8_DTYPES = {"fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


@dataclass(frozen=True, eq=False)
class Codebook:
    """Levels of a table format; ``levels[code]`` is the value of ``code``.

    Attributes:
        levels: ``(n_codes,)`` float32, value of each code (duplicates such as -0 allowed).
        order: ``(n_unique,)`` int64, codes of the distinct levels in ascending value order.
        midpoints: ``(n_unique - 1,)`` float32, decision thresholds between consecutive distinct levels.
    """

    levels: torch.Tensor
    order: torch.Tensor
    midpoints: torch.Tensor

    @classmethod
    def from_levels(cls, levels: list[float]) -> "Codebook":
        lv = torch.tensor(levels, dtype=torch.float32)
        first_code: dict[float, int] = {}
        for code, v in enumerate(levels):
            first_code.setdefault(float(v) + 0.0, code)  # + 0.0 folds -0.0 into 0.0
        vals = sorted(first_code)
        order = torch.tensor([first_code[v] for v in vals], dtype=torch.int64)
        sv = torch.tensor(vals, dtype=torch.float32)
        return cls(lv, order, (sv[1:] + sv[:-1]) / 2)

    @property
    def max(self) -> float:
        return float(self.levels.abs().max())

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Nearest level: float tensor (any shape) -> uint8 codes of the same shape."""
        idx = torch.bucketize(x.float(), self.midpoints)
        return self.order[idx].to(torch.uint8)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """uint8 codes -> float32 values of the same shape."""
        return self.levels[codes.long()]


@lru_cache(maxsize=None)
def nf4_levels() -> tuple[float, ...]:
    """NF4 levels: 8 positive and 7 negative N(0,1) quantiles plus 0, normalised to [-1, 1] (QLoRA, App. E)."""
    offset = 0.9677083  # the paper's outermost quantile: 0.5 * (1/(2*15) + 1 - 1/(2*16)) = 0.9677083...
    normal = torch.distributions.Normal(0.0, 1.0)
    pos = normal.icdf(torch.linspace(offset, 0.5, 9, dtype=torch.float64)[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8, dtype=torch.float64)[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    return tuple((v / v.abs().max()).tolist())


_FP4_MAGNITUDES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


@lru_cache(maxsize=None)
def codebook(fmt: str) -> Codebook:
    """The table of a non-integer element format (``fp4_e2m1``, ``nf4``, ``ternary``, ``fp8_*``)."""
    if fmt == "fp4_e2m1":
        return Codebook.from_levels(list(_FP4_MAGNITUDES) + [-m for m in _FP4_MAGNITUDES])
    if fmt == "nf4":
        return Codebook.from_levels(list(nf4_levels()))
    if fmt == "ternary":
        return Codebook.from_levels([-1.0, 0.0, 1.0])
    if fmt in _FP8_DTYPES:
        codes = torch.arange(256, dtype=torch.uint8)
        levels = codes.view(_FP8_DTYPES[fmt]).float()
        finite = torch.isfinite(levels)
        # NaN/Inf codes are never produced by encode; give them 0 so the table stays finite
        return Codebook(torch.where(finite, levels, torch.zeros(())), torch.empty(0, dtype=torch.int64), torch.empty(0))
    raise KeyError(fmt)


def element_max(fmt: str, bits: int) -> float:
    """Largest magnitude an element can hold before scaling."""
    if fmt == "int":
        return float(2 ** (bits - 1) - 1)
    if fmt in _FP8_DTYPES:
        return float(torch.finfo(_FP8_DTYPES[fmt]).max)
    return codebook(fmt).max


def encode_elements(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Scaled values -> uint8 codes of a table format (saturating at the largest level)."""
    if fmt in _FP8_DTYPES:
        m = element_max(fmt, 8)
        return x.float().clamp(-m, m).to(_FP8_DTYPES[fmt]).view(torch.uint8)
    return codebook(fmt).encode(x)


def decode_elements(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """uint8 codes of a table format -> float32 values (before scaling)."""
    if fmt in _FP8_DTYPES:
        return codes.view(_FP8_DTYPES[fmt]).float()
    return codebook(fmt).decode(codes)

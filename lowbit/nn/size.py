"""How big a (quantized) model is: in memory and per quantized weight (on disk: ``lowbit.io.artifact_size``).

``model_size`` counts every tensor of the model's state once (tied weights and shared modules are not
counted twice) and splits it into the quantized weights' storage (packed codes, scales, zero points,
NVFP4 global scales: ``QuantModule.storage_bytes()``) and everything else, which stays in float: biases,
norms, embeddings and heads left unquantized, BatchNorm statistics, activation ranges.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.nn.state import distinct_tensors, quantized_modules, weight_storage_keys


@dataclass(frozen=True)
class SizeReport:
    """Sizes of a model's state.

    Attributes:
        quantized_layers: number of distinct quantized modules.
        quantized_weights: weights stored quantized (elements of their float weight shapes).
        quantized_bytes: bytes of those weights' storage: codes + scales + zero points (+ global scales).
        float_params: elements of every other state tensor (parameters and persistent buffers), tied
            tensors once.
        float_bytes: bytes of those tensors in their own dtypes.
    """

    quantized_layers: int
    quantized_weights: int
    quantized_bytes: int
    float_params: int
    float_bytes: int

    @property
    def total_bytes(self) -> int:
        """Bytes of the whole state: quantized storage + everything else."""
        return self.quantized_bytes + self.float_bytes

    @property
    def bits_per_quantized_weight(self) -> float:
        """Storage bits per quantized weight, scales and zero points included (NaN when none)."""
        if self.quantized_weights == 0:
            return math.nan
        return 8 * self.quantized_bytes / self.quantized_weights

    def to_dict(self) -> dict[str, Any]:
        """JSON-able: the fields plus ``total_bytes`` and ``bits_per_quantized_weight`` (null when none)."""
        bpw = self.bits_per_quantized_weight
        return {"quantized_layers": self.quantized_layers, "quantized_weights": self.quantized_weights,
                "quantized_bytes": self.quantized_bytes, "float_params": self.float_params,
                "float_bytes": self.float_bytes, "total_bytes": self.total_bytes,
                "bits_per_quantized_weight": None if math.isnan(bpw) else bpw}

    def describe(self) -> str:
        """One line, e.g. ``total 35.3 kB: 65,536 quantized weights in 34.3 kB (4.188 bits/weight, ...``."""
        if self.quantized_weights == 0:
            q = "no quantized weights"
        else:
            q = (f"{self.quantized_weights:,} quantized weights in {self.quantized_layers} layer(s), "
                 f"{human_bytes(self.quantized_bytes)} ({self.bits_per_quantized_weight:.3f} bits/weight with "
                 f"scales and zero points)")
        return f"total {human_bytes(self.total_bytes)}: {q}; {self.float_params:,} float values in " \
               f"{human_bytes(self.float_bytes)}"


def model_size(model: nn.Module) -> SizeReport:
    """Count ``model``'s state (see the module docstring). Pure: reads the model, changes nothing."""
    layers, _ = quantized_modules(model)
    # tensors only: a module's non-tensor extra state (which save refuses) has no size to count here
    canonical, _ = distinct_tensors({k: v for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)})
    storage = weight_storage_keys(model)
    rest = [t for key, t in canonical.items() if key not in storage]
    return SizeReport(
        quantized_layers=len(layers),
        quantized_weights=sum(math.prod(m.weight_shape) for m in layers.values()),
        quantized_bytes=sum(m.storage_bytes() for m in layers.values()),
        float_params=sum(t.numel() for t in rest),
        float_bytes=sum(t.numel() * t.element_size() for t in rest),
    )


def human_bytes(n: int) -> str:
    """Decimal units: ``999 B``, ``34.3 kB``, ``1.2 MB``, ``3.40 GB``."""
    if n < 1000:
        return f"{n} B"
    for unit, div in (("kB", 1e3), ("MB", 1e6)):
        if n < div * 1000:
            return f"{n / div:.1f} {unit}"
    return f"{n / 1e9:.2f} GB"

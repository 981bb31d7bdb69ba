"""Per-layer report of a quantized model: format, real bits per weight, and error against the float weight.

``layer_table(model, reference)`` gives one :class:`LayerRow` per quantized module. The SQNR column
compares the module's dequantized weight with the float weight of the module of the same name in
``reference`` (the float model, in lowbit's ``(out, in)`` layout: ``lowbit.nn.convert.float_weight``
transposes transformers' ``Conv1D``). For a layer with a per-input scale (AWQ) the compared weight is the
one it applies to its input, ``QuantModule.effective_weight()`` (dequantized weight times input scale).
A saved artifact holds no float copy of a quantized weight, so the SQNR of a loaded model needs the float
model it came from; without one the column is None.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.formats import as_matrix_shape
from lowbit.nn.state import quantized_modules
from lowbit.nn.base import QuantModule
from lowbit.nn.convert import float_weight


@dataclass(frozen=True)
class LayerRow:
    """One quantized module.

    Attributes:
        name: dotted module name.
        module_type: e.g. ``QuantLinear``.
        weight_shape: the float weight's shape in lowbit's layout, e.g. ``(out, in)``.
        format: ``spec.name``, plus ``+act:<ActivationQuant.name>`` when inputs are quantized.
        bits_per_weight: storage bits per weight (codes, scales, zero points, padding included).
        sqnr_db: SQNR of the effective (dequantized, input-scaled) weight against the reference's float
            weight, in dB (``inf`` when identical); None without a reference.
        notes: irregular tiling, e.g. ``last group 64 of 128``; empty when none.
    """

    name: str
    module_type: str
    weight_shape: tuple[int, ...]
    format: str
    bits_per_weight: float
    sqnr_db: float | None
    notes: str


def layer_table(model: nn.Module, reference: nn.Module | None = None) -> list[LayerRow]:
    """One row per quantized module of ``model``, in module order (a shared module once).

    Raises:
        InputError: ``reference`` lacks a module of that name, holds a quantized module there (pass the
            float model, not the quantized one), or its weight has another shape.
    """
    ref_modules = dict(reference.named_modules()) if reference is not None else None
    layers, _ = quantized_modules(model)
    rows = []
    for name, qm in layers.items():
        fmt = qm.spec.name + ("" if qm.act is None else f"+act:{qm.act.name}")
        sqnr = None
        if ref_modules is not None:
            sqnr = sqnr_db(_reference_weight(name, qm, ref_modules), qm.effective_weight())
        rows.append(LayerRow(name, type(qm).__name__, qm.weight_shape, fmt, qm.bits_per_weight(), sqnr,
                             tiling_notes(qm)))
    return rows


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - approx)^2)`` in dB.

    Both tensors have the same shape (any dtype; computed in float64). ``+inf`` when they are equal.
    """
    if tuple(reference.shape) != tuple(approx.shape):
        raise InputError(f"SQNR needs tensors of one shape, got {tuple(reference.shape)} and {tuple(approx.shape)}")
    ref, app = reference.detach().double(), approx.detach().double()
    noise = (ref - app).pow(2).sum().item()
    if noise == 0:
        return math.inf
    signal = ref.pow(2).sum().item()
    return -math.inf if signal == 0 else 10 * math.log10(signal / noise)


def tiling_notes(qm: QuantModule) -> str:
    """Where the scale tiles do not divide the weight's 2-D view, e.g. ``last group 64 of 128``."""
    spec = qm.spec
    rows, cols = as_matrix_shape(qm.weight_shape)
    if spec.granularity == "group" and cols % spec.group_size:
        return f"last group {cols % spec.group_size} of {spec.group_size}"
    if spec.granularity == "block":
        br, bc = spec.block_shape
        if rows % br or cols % bc:
            return f"edge blocks {rows % br or br}x{cols % bc or bc} of {br}x{bc}"
    return ""


def format_table(rows: list[LayerRow]) -> str:
    """An aligned plain-text table of ``rows`` (text columns left, numbers right), ending in no newline."""
    header = ("layer", "type", "weight", "format", "bits/w", "SQNR dB", "notes")
    cells = [header] + [
        (r.name, r.module_type, "x".join(map(str, r.weight_shape)), r.format, f"{r.bits_per_weight:.3f}",
         _fmt_db(r.sqnr_db), r.notes)
        for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    right = {4, 5}
    lines = []
    for c in cells:
        parts = [c[i].rjust(widths[i]) if i in right else c[i].ljust(widths[i]) for i in range(len(header))]
        lines.append("  ".join(parts).rstrip())
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt_db(v: float | None) -> str:
    if v is None:
        return "-"
    return "inf" if math.isinf(v) and v > 0 else f"{v:.1f}"


def _reference_weight(name: str, qm: QuantModule, ref_modules: dict[str, nn.Module]) -> torch.Tensor:
    """The float weight of the reference's module ``name``, checked against ``qm``."""
    ref = ref_modules.get(name)
    if ref is None:
        raise InputError(f"the reference model has no module {name!r}; pass the float model this one came from")
    if isinstance(ref, QuantModule):
        raise InputError(f"the reference's module {name!r} is quantized too; pass the float model (quantize() "
                         f"changes a model in place, so load a fresh copy)")
    if not isinstance(getattr(ref, "weight", None), torch.Tensor):
        raise InputError(f"the reference's module {name!r} is a {type(ref).__name__} without a weight")
    w = float_weight(ref)
    if tuple(w.shape) != qm.weight_shape:
        raise InputError(f"module {name!r}: reference weight {tuple(w.shape)} does not match the quantized "
                         f"weight {qm.weight_shape}")
    return w

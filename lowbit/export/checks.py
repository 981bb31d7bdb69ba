"""What the weight-only exports (GGUF, compressed-tensors) refuse alike, with messages naming the module."""

from __future__ import annotations

from torch import nn

from lowbit.errors import InputError
from lowbit.nn import RotatedLinear
from lowbit.nn.base import QuantModule


def weight_only_problem(name: str, m: QuantModule, fmt: str, runtime: str) -> str | None:
    """Why quantized module ``name`` cannot go into a weight-only ``fmt`` file read by ``runtime``, beyond its
    number format: activation quantization, AWQ's input scales, an online rotation, or released storage."""
    if getattr(m, "act", None) is not None:
        return f"{name}: activation quantization ({m.act.name}) cannot be stored in {fmt} (weights only)"
    if getattr(m, "input_scale", None) is not None:
        return (f"{name}: has AWQ per-input-channel scales, which {fmt} cannot store; fold them into the norms "
                f"(--transforms awq_scales) or quantize with --method gptq or rtn for this export")
    if getattr(m, "input_rotation", None) is not None:
        return (f"{name}: rotates its input online (a Hadamard of {m.input_rotation} features), which {runtime} "
                f"does not run; use the transform rotate_residual (offline only) for this export")
    if m.storage_released:
        return f"{name}: its weight storage was handed to a kernel; load the model again"
    return None


def rotated_float_linears(model: nn.Module, runtime: str) -> list[str]:
    """One problem per float linear that rotates its input online (``RotatedLinear``)."""
    return [f"{n}: a float linear that rotates its input online, which {runtime} does not run; use the transform "
            f"rotate_residual (offline only) for this export" for n, m in model.named_modules()
            if isinstance(m, RotatedLinear)]


def refuse(problems: list[str], fmt: str) -> None:
    """InputError naming the first problem (and how many more), when there are any."""
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise InputError(f"cannot export to {fmt}: {problems[0]}{more}")

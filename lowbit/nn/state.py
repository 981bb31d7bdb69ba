"""A model's state as files see it: named tensors, each distinct storage once, aliases for the ties.

Tied weights (GPT-2's ``lm_head.weight is transformer.wte.weight``) and modules registered under two names
appear in ``state_dict()`` under several keys that share one storage. safetensors refuses shared storage,
and a size report must not count a tied tensor twice, so both go through :func:`distinct_tensors`:
the first key of each distinct tensor (same memory, dtype, shape and strides) is canonical, later keys
are aliases of it.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.nn.base import QuantModule

# the attribute ``lowbit.quantize`` leaves on a model: how it was calibrated (the order of stacks and layers, the
# tokens each stack saw, the layers an algorithm could not take, a tie kept); ``lowbit.save`` writes it into the
# manifest as ``extra["calibration"]`` and ``lowbit inspect`` prints it
CALIBRATION_ATTR = "lowbit_calibration"

# the buffers QuantModule.storage_bytes() counts: the quantized weight itself, with a linear's per-input
# scale (AWQ), but not its bias or act range
WEIGHT_STORAGE = ("qweight", "scale", "zero_point", "global_scale", "super_scale", "super_min", "input_scale")


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()``, checked to hold only dense tensors (no pickled extra state)."""
    state = model.state_dict()
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise InputError(
                f"state entry {key!r} of {type(model).__name__} is a {type(value).__name__}, not a tensor "
                f"(a module's get_extra_state); lowbit files hold tensors only and never pickle objects"
            )
        if value.layout != torch.strided:
            raise InputError(f"state entry {key!r} is a {value.layout} tensor; convert it with .to_dense()")
    return state


def tensor_identity(t: torch.Tensor) -> tuple | None:
    """A key equal for two tensors exactly when they are the same view of the same memory.

    None for tensors without memory (empty, or on the meta device): those are never aliases.
    """
    if t.device.type == "meta" or t.numel() == 0:
        return None
    return (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())


def distinct_tensors(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split ``state`` into (canonical key -> tensor, alias key -> canonical key), in state order."""
    canonical: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[tuple, str] = {}
    for key, t in state.items():
        ident = tensor_identity(t)
        if ident is not None and ident in first:
            aliases[key] = first[ident]
            continue
        if ident is not None:
            first[ident] = key
        canonical[key] = t
    return canonical, aliases


def for_safetensors(canonical: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory with each other (what safetensors accepts).

    Canonical tensors are distinct views; two views of one storage (say halves of a fused weight) are
    cloned so each is written on its own. Values and dtypes are unchanged.
    """
    storages: dict[tuple, int] = {}
    for t in canonical.values():
        if t.numel():
            k = (t.device, t.untyped_storage().data_ptr())
            storages[k] = storages.get(k, 0) + 1
    out = {}
    for key, t in canonical.items():
        shared = t.numel() and storages[(t.device, t.untyped_storage().data_ptr())] > 1
        t = t.detach().cpu()
        out[key] = t.clone(memory_format=torch.contiguous_format) if shared or not t.is_contiguous() else t
    return out


def quantized_modules(model: nn.Module) -> tuple[dict[str, QuantModule], dict[str, str]]:
    """(first name -> quantized module, other name -> first name) over every registered path."""
    first: dict[int, str] = {}
    layers: dict[str, QuantModule] = {}
    shared: dict[str, str] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if not isinstance(m, QuantModule):
            continue
        if id(m) in first:
            shared[name] = first[id(m)]
        else:
            first[id(m)] = name
            layers[name] = m
    return layers, shared


def weight_storage_keys(model: nn.Module) -> set[str]:
    """State keys of every quantized module's weight storage (see ``WEIGHT_STORAGE``), all paths."""
    keys = set()
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, QuantModule):
            for b in WEIGHT_STORAGE:
                if getattr(m, b, None) is not None:
                    keys.add(f"{name}.{b}" if name else b)
    return keys

"""Which float modules lowbit quantizes, and how each becomes (or is rebuilt as) a quantized module.

One explicit table: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``, and transformers'
``Conv1D`` (GPT-2's linear layer, which stores its weight transposed as ``(in, out)``).

Subclasses of those count when they keep the base class's ``forward``. A subclass with its own ``forward``
computes something lowbit cannot know, so it is not quantized (and ``quantize`` says so), with one
recognised exception: convolutions that apply a ``static_padding`` module (``nn.ZeroPad2d`` or an identity)
before the convolution, as TensorFlow-style 'SAME' layers do (EfficientNet ports); that padding is kept.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.formats import QuantizedTensor
from lowbit.nn.base import QuantModule
from lowbit.nn.conv import QuantConv1d, QuantConv2d
from lowbit.nn.embedding import QuantEmbedding
from lowbit.nn.linear import QuantLinear
from lowbit.spec import ActivationQuant, QuantSpec

QUANT_MODULES: dict[str, type[QuantModule]] = {
    "QuantLinear": QuantLinear,
    "QuantConv1d": QuantConv1d,
    "QuantConv2d": QuantConv2d,
    "QuantEmbedding": QuantEmbedding,
}

SUPPORTED = "nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding and transformers' Conv1D"


def _is_hf_conv1d(m: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, recognised by its shape attribute so transformers stays optional
    return type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not None


_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)


def _base_of(m: nn.Module) -> type | None:
    for base in _BASES:
        if isinstance(m, base):
            return base
    return None


def _static_padding(m: nn.Module) -> tuple[int, ...] | None:
    """F.pad tuple of a 'SAME'-style conv's ``static_padding`` module (None for identity / absent)."""
    pad = getattr(m, "static_padding", None)
    if isinstance(pad, nn.ZeroPad2d):
        return tuple(int(p) for p in pad.padding)
    return None


def _has_static_padding(m: nn.Module) -> bool:
    pad = getattr(m, "static_padding", None)
    return isinstance(pad, nn.ZeroPad2d) or isinstance(pad, nn.Identity) or type(pad).__name__ == "Identity"


def is_linear_like(m: nn.Module) -> bool:
    """A linear map of the last dimension: ``nn.Linear`` (and plain subclasses) or transformers' ``Conv1D``."""
    return _is_hf_conv1d(m) or (isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward)


def is_quantizable(m: nn.Module) -> bool:
    """True for the module kinds lowbit can replace by a quantized module."""
    if _is_hf_conv1d(m):
        return True
    base = _base_of(m)
    if base is None:
        return False
    if type(m).forward is base.forward:
        return True
    return base in (nn.Conv1d, nn.Conv2d) and _has_static_padding(m)


def unsupported_subclass(m: nn.Module) -> bool:
    """A subclass of a supported kind with its own ``forward`` (left in float, with a warning)."""
    return _base_of(m) is not None and not is_quantizable(m)


def float_weight(m: nn.Module) -> torch.Tensor:
    """The weight in lowbit's layout: ``(out, in)`` for linears, ``(out, in/groups, *k)`` for convs,
    ``(num_embeddings, dim)`` for embeddings."""
    if _is_hf_conv1d(m):
        return m.weight.detach().t()
    return m.weight.detach()


def to_quantized(
    m: nn.Module,
    q: QuantizedTensor,
    act: ActivationQuant | None = None,
    input_scale: torch.Tensor | None = None,
) -> QuantModule:
    """A quantized module standing in for the float module ``m``, holding ``q``.

    ``input_scale``: optional float ``(in_features,)`` positive scale a linear multiplies its input by
    before ``q`` (AWQ's ``1 / s``); linears only.
    """
    if input_scale is not None and not (isinstance(m, nn.Linear) or _is_hf_conv1d(m)):
        raise InputError(f"an input scale (AWQ) applies to linear layers only, not to a {type(m).__name__}")
    if isinstance(m, nn.Embedding):
        if act is not None:
            raise InputError("embeddings take integer ids; activation quantization does not apply")
        return QuantEmbedding.from_float(m, q)
    if not is_quantizable(m):
        raise InputError(f"cannot quantize a {type(m).__name__}; lowbit quantizes {SUPPORTED}")
    if isinstance(m, nn.Conv2d):
        return QuantConv2d.from_float(m, q, act, _static_padding(m))
    if isinstance(m, nn.Conv1d):
        return QuantConv1d.from_float(m, q, act, _static_padding(m))
    if isinstance(m, nn.Linear) or _is_hf_conv1d(m):
        return QuantLinear.from_float(float_weight(m), m.bias, q, act, input_scale)
    raise InputError(f"cannot quantize a {type(m).__name__}; lowbit quantizes {SUPPORTED}")


def layer_record(m: QuantModule) -> dict[str, Any]:
    """Everything needed to rebuild an empty ``m`` before loading its state: JSON-able."""
    return {
        "type": type(m).__name__,
        "config": m.layer_config(),
        "spec": m.spec.to_dict(),
        "act": None if m.act is None else m.act.to_dict(),
    }


def from_layer_record(rec: dict[str, Any]) -> QuantModule:
    """Inverse of :func:`layer_record`: an empty quantized module of the recorded kind and shape."""
    cls = QUANT_MODULES.get(rec.get("type", ""))
    if cls is None:
        raise InputError(f"unknown quantized module type {rec.get('type')!r}; known: {', '.join(QUANT_MODULES)}")
    spec = QuantSpec.from_dict(rec["spec"])
    act = None if rec.get("act") is None else ActivationQuant.from_dict(rec["act"])
    c = rec["config"]
    if cls is QuantLinear:
        return QuantLinear(c["in_features"], c["out_features"], c["bias"], spec, act, bool(c.get("input_scale", False)))
    if cls is QuantEmbedding:
        return QuantEmbedding(c["num_embeddings"], c["embedding_dim"], spec, c.get("padding_idx"))
    padding = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
    ipad = c.get("input_padding")
    return cls(tuple(c["weight_shape"]), c["bias"], spec, tuple(c["stride"]), padding, tuple(c["dilation"]),
               c["groups"], act, None if ipad is None else tuple(ipad))

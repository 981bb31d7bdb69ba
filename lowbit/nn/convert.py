"""Which float modules lowbit quantizes, and how each becomes (or is rebuilt as) a quantized module.

One explicit table: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``, and transformers'
``Conv1D`` (GPT-2's linear layer, which stores its weight transposed as ``(in, out)``).

Subclasses of those count when they keep the base class's ``forward``. A subclass with its own ``forward``
computes something lowbit cannot know, so it is not quantized (and ``quantize`` says so), with two
recognised exceptions: lowbit's own ``RotatedLinear`` (``lowbit.nn.rotation``; its online input rotation is
carried into the quantized linear), and convolutions that apply a ``static_padding`` module
(``nn.ZeroPad2d`` or an identity) before the convolution, as TensorFlow-style 'SAME' layers do (EfficientNet
ports); that padding is kept.
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
from lowbit.nn.rotation import RotatedLinear, input_rotation
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
    """A linear map of the last dimension: ``nn.Linear`` (and plain subclasses), transformers' ``Conv1D``, or
    lowbit's own :class:`~lowbit.nn.rotation.RotatedLinear` (a linear after an online rotation)."""
    return _is_hf_conv1d(m) or type(m) is RotatedLinear or (
        isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward)


def is_quantizable(m: nn.Module) -> bool:
    """True for the module kinds lowbit can replace by a quantized module."""
    if _is_hf_conv1d(m) or type(m) is RotatedLinear:
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

    ``input_scale``: optional float ``(in_features,)`` positive scale a linear (or a convolution with
    ``groups == 1``, per input channel) multiplies its input by before ``q`` (AWQ's ``1 / s``).
    """
    conv = isinstance(m, (nn.Conv1d, nn.Conv2d))
    if input_scale is not None and not (isinstance(m, nn.Linear) or _is_hf_conv1d(m) or (conv and m.groups == 1)):
        raise InputError(f"an input scale (AWQ) applies to linear layers and convolutions with groups=1 only, "
                         f"not to a {type(m).__name__}{f' with groups={m.groups}' if conv else ''}")
    if isinstance(m, nn.Embedding):
        if act is not None:
            raise InputError("embeddings take integer ids; activation quantization does not apply")
        return QuantEmbedding.from_float(m, q)
    if not is_quantizable(m):
        raise InputError(f"cannot quantize a {type(m).__name__}; lowbit quantizes {SUPPORTED}")
    if isinstance(m, nn.Conv2d):
        return QuantConv2d.from_float(m, q, act, _static_padding(m), input_scale)
    if isinstance(m, nn.Conv1d):
        return QuantConv1d.from_float(m, q, act, _static_padding(m), input_scale)
    if isinstance(m, nn.Linear) or _is_hf_conv1d(m):
        return QuantLinear.from_float(float_weight(m), m.bias, q, act, input_scale, input_rotation(m))
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
    """Inverse of :func:`layer_record`: an empty quantized module of the recorded kind and shape.

    The record is checked first (:func:`check_layer_record`), so a damaged one raises InputError instead of
    reaching a constructor. Build under ``torch.device("meta")`` to learn the module's state shapes and dtypes
    without allocating them (``lowbit.load`` does, before it reads any tensor).
    """
    check_layer_record(rec)
    cls = QUANT_MODULES[rec["type"]]
    spec = QuantSpec.from_dict(rec["spec"])
    act = None if rec["act"] is None else ActivationQuant.from_dict(rec["act"])
    c = {**_OPTIONAL, **rec["config"]}
    if cls is QuantLinear:
        return QuantLinear(c["in_features"], c["out_features"], c["bias"], spec, act, c["input_scale"],
                           c["input_rotation"])
    if cls is QuantEmbedding:
        if act is not None:
            raise InputError("an embedding record has activation settings; embeddings take integer ids")
        return QuantEmbedding(c["num_embeddings"], c["embedding_dim"], spec, c["padding_idx"])
    padding = c["padding"] if isinstance(c["padding"], str) else tuple(c["padding"])
    ipad = c["input_padding"]
    return cls(tuple(c["weight_shape"]), c["bias"], spec, tuple(c["stride"]), padding, tuple(c["dilation"]),
               c["groups"], act, None if ipad is None else tuple(ipad), c["input_scale"])


# ---- the layer record's schema ------------------------------------------------------------------------------

MAX_DIM = 2**31 - 1  # any one dimension; the real bound is the saved file, checked by lowbit.load
_SIZE, _FLAG, _SIZES, _SHAPE = "size", "flag", "sizes", "shape"
_CONFIG_SCHEMA: dict[str, dict[str, str]] = {
    "QuantLinear": {"in_features": _SIZE, "out_features": _SIZE, "bias": _FLAG, "input_scale": _FLAG,
                    "input_rotation": "size or null"},
    "QuantEmbedding": {"num_embeddings": _SIZE, "embedding_dim": _SIZE, "padding_idx": "index or null"},
    "QuantConv1d": {"weight_shape": _SHAPE, "bias": _FLAG, "stride": _SIZES, "padding": "pads or mode",
                    "dilation": _SIZES, "groups": _SIZE, "input_padding": "pads or null", "input_scale": _FLAG},
}
_CONFIG_SCHEMA["QuantConv2d"] = _CONFIG_SCHEMA["QuantConv1d"]
_CONV_DIMS = {"QuantConv1d": 1, "QuantConv2d": 2}
# keys that records written before they existed lack, with the value that means "absent"
_OPTIONAL = {"input_scale": False, "input_padding": None, "input_rotation": None}


def check_layer_record(rec: Any) -> None:
    """Raise InputError unless ``rec`` has exactly the keys and value types :func:`layer_record` writes.

    Sizes are integers in 1 .. ``MAX_DIM`` (booleans are not integers here), paddings non-negative, a
    convolution's lists as long as its dimensions; the spec and activation settings must parse. Only the keys
    added after the format's first version (``input_scale``, ``input_padding``) may be missing.
    """
    if not isinstance(rec, dict) or set(rec) != {"type", "config", "spec", "act"}:
        got = sorted(rec) if isinstance(rec, dict) else type(rec).__name__
        raise InputError(f"a layer record has exactly the keys act, config, spec, type; got {got}")
    kind = rec["type"]
    if not isinstance(kind, str) or kind not in QUANT_MODULES:
        raise InputError(f"unknown quantized module type {kind!r}; known: {', '.join(QUANT_MODULES)}")
    c, schema = rec["config"], _CONFIG_SCHEMA[kind]
    required = set(schema) - set(_OPTIONAL)
    if not isinstance(c, dict) or not required <= set(c) <= set(schema):
        got = sorted(c) if isinstance(c, dict) else type(c).__name__
        raise InputError(f"a {kind} config has the keys {sorted(schema)}; got {got}")
    c = {**{k: v for k, v in _OPTIONAL.items() if k in schema}, **c}
    dims = _CONV_DIMS.get(kind)
    for key, what in schema.items():
        if not _fits(c[key], what, dims):
            raise InputError(f"{kind} config {key!r} must be {_describe(what, dims)}, got {c[key]!r}")
    if kind == "QuantEmbedding" and c["padding_idx"] is not None and c["padding_idx"] >= c["num_embeddings"]:
        raise InputError(f"QuantEmbedding padding_idx {c['padding_idx']} is not below num_embeddings "
                         f"{c['num_embeddings']}")
    if dims is not None and (c["weight_shape"][1] * c["groups"] > MAX_DIM or c["weight_shape"][0] % c["groups"]):
        raise InputError(f"{kind} weight_shape {c['weight_shape']} does not fit {c['groups']} group(s)")
    if not isinstance(rec["spec"], dict):
        raise InputError(f"a layer record's spec must be a JSON object, got {type(rec['spec']).__name__}")
    QuantSpec.from_dict(rec["spec"])  # raises InputError naming the bad field
    if rec["act"] is not None:
        if not isinstance(rec["act"], dict):
            raise InputError(f"a layer record's act must be a JSON object or null, got {type(rec['act']).__name__}")
        ActivationQuant.from_dict(rec["act"])


def _is_int(v: Any, lo: int, hi: int = MAX_DIM) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _fits(v: Any, what: str, dims: int | None) -> bool:
    if what == _SIZE:
        return _is_int(v, 1)
    if what == _FLAG:
        return isinstance(v, bool)
    if what == "index or null":
        return v is None or _is_int(v, 0)
    if what == "size or null":
        return v is None or _is_int(v, 1)
    n = dims or 0
    if what in (_SIZES, _SHAPE):  # weight_shape is (out, in/groups, *kernel); stride, dilation per spatial dim
        return isinstance(v, list) and all(_is_int(x, 1) for x in v) and len(v) == (n + 2 if what == _SHAPE else n)
    pads = isinstance(v, list) and all(_is_int(x, 0) for x in v)
    if what == "pads or mode":
        return v in ("same", "valid") or (pads and len(v) == n)
    return v is None or (pads and len(v) == 2 * n)  # "pads or null": F.pad order, two per spatial dim


def _describe(what: str, dims: int | None) -> str:
    return {_SIZE: f"an integer in 1..{MAX_DIM}", _FLAG: "true or false",
            "index or null": "a non-negative integer or null", "size or null": f"an integer in 1..{MAX_DIM} or null",
            _SIZES: f"a list of {dims} positive integer(s), one per spatial dimension",
            _SHAPE: f"a list of {(dims or 0) + 2} positive integers (out, in / groups, *kernel)",
            "pads or mode": f"'same', 'valid' or {dims} non-negative integers",
            "pads or null": f"null or {2 * (dims or 0)} non-negative integers"}[what]

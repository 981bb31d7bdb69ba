"""KV-cache quantization of Hugging Face attention: keys and values rounded to a low-bit format as they are cached.

:func:`attach_kv_quant` hooks a Hugging Face model so that every ``transformers`` ``Cache`` its attention
layers write (one passed in, as ``generate`` does, or one the hook creates when the call brings none)
quantizes the new keys and values on their way in: ``(batch, heads, tokens, head_dim)`` viewed as
``(batch x heads x tokens, head_dim)`` rows, each row (one head of one token) quantized with the
:class:`~lowbit.spec.KVCacheQuant` spec (per row, or in groups of its channels), optionally after a
normalized Hadamard across ``head_dim`` (undone after rounding, so attention sees the same geometry). The
attention then reads the rounded keys and values for every token, the current ones included, as a quantized
cache would give them.

The cache holds the rounded values in the model's float dtype: this measures what quantizing the cache does to
quality (perplexity, agreement); it does not make the cache smaller yet. A call made with ``use_cache=False``
gets a cache for the duration of the call (so its attention is quantized too) and returns none, as asked.
"""

from __future__ import annotations

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.formats import fake_quantize_dynamic
from lowbit.hadamard import hadamard_transform, is_hadamard_width
from lowbit.spec import KVCacheQuant

KV_ATTR = "_lowbit_kv"  # on the model: its KVCacheQuant; on a cache: the one its update applies


def attach_kv_quant(model: nn.Module, kv: KVCacheQuant) -> None:
    """Quantize ``model``'s KV cache with ``kv`` from now on (replaces an earlier setting)."""
    check_kv_quant(model, kv)
    detach_kv_quant(model)
    object.__setattr__(model, KV_ATTR, kv)
    handles = [model.register_forward_pre_hook(_pre_hook, with_kwargs=True),
               model.register_forward_hook(_post_hook, with_kwargs=True)]
    object.__setattr__(model, "_lowbit_kv_handles", handles)


def check_kv_quant(model: nn.Module, kv: KVCacheQuant) -> None:
    """InputError unless ``kv`` can quantize ``model``'s cache (a Hugging Face model; groups tile its heads)."""
    if not isinstance(kv, KVCacheQuant):
        raise InputError(f"attach_kv_quant needs a KVCacheQuant, got {type(kv).__name__}")
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "forward"):
        raise InputError(f"{type(model).__name__}: KV-cache quantization needs a Hugging Face model (with a config) "
                         f"whose attention writes a transformers Cache")
    head_dim = _head_dim(config)
    if kv.rotate and head_dim is not None and not is_hadamard_width(head_dim):
        raise InputError(f"{type(model).__name__}: kv-cache rotate needs a Hadamard order for the head width "
                         f"{head_dim}; use rotate: false")
    if kv.spec.granularity == "group" and head_dim is not None and head_dim % kv.spec.group_size:
        raise InputError(f"kv-cache format {kv.spec.name}: groups of {kv.spec.group_size} do not tile the head "
                         f"width {head_dim}")


def detach_kv_quant(model: nn.Module) -> None:
    """Stop quantizing ``model``'s KV cache (no-op if it was not)."""
    for h in model.__dict__.pop("_lowbit_kv_handles", []):
        h.remove()
    model.__dict__.pop(KV_ATTR, None)


def kv_quant_of(model: nn.Module) -> KVCacheQuant | None:
    """The KV-cache quantization attached to ``model``, or None."""
    return model.__dict__.get(KV_ATTR)


def quantize_kv(x: torch.Tensor, kv: KVCacheQuant) -> torch.Tensor:
    """Keys or values ``(..., head_dim)`` rounded as the cache stores them; same shape and dtype."""
    rows = x.reshape(-1, x.shape[-1])  # (batch x heads x tokens, head_dim)
    if rows.numel() == 0:
        return x
    if not bool(torch.isfinite(rows).all()):
        raise InputError(f"keys/values of shape {tuple(x.shape)} hold NaN/Inf before KV-cache quantization")
    if kv.rotate:
        rows = hadamard_transform(rows.float())
    q = fake_quantize_dynamic(rows.float(), kv.spec, kv.clip)
    if kv.rotate:
        q = hadamard_transform(q, transpose=True)
    return q.to(x.dtype).reshape(x.shape)


def _head_dim(config) -> int | None:
    text = getattr(config, "get_text_config", lambda: config)()
    hd = getattr(text, "head_dim", None)
    if isinstance(hd, int):
        return hd
    heads, hidden = getattr(text, "num_attention_heads", None), getattr(text, "hidden_size", None)
    return hidden // heads if isinstance(heads, int) and isinstance(hidden, int) and heads else None


def _pre_hook(model: nn.Module, args: tuple, kwargs: dict):
    kv = model.__dict__.get(KV_ATTR)
    if kv is None:
        return None
    cache = kwargs.get("past_key_values")
    made = cache is None
    if made:
        from transformers import DynamicCache  # lazy: lowbit.nn does not need transformers otherwise

        cache = DynamicCache(config=model.config)
        kwargs["past_key_values"] = cache
    elif not hasattr(cache, "update"):
        raise InputError(f"{type(model).__name__}: past_key_values is a {type(cache).__name__}, not a transformers "
                         f"Cache; KV-cache quantization needs one")
    object.__setattr__(model, "_lowbit_kv_made", made and kwargs.get("use_cache") is False)
    if made:
        kwargs["use_cache"] = True
    _wrap(cache, kv)
    return args, kwargs


def _post_hook(model: nn.Module, args: tuple, kwargs: dict, output):
    if model.__dict__.pop("_lowbit_kv_made", False) and hasattr(output, "past_key_values"):
        output.past_key_values = None  # the call asked for no cache
    return output


def _wrap(cache, kv: KVCacheQuant) -> None:
    if cache.__dict__.get(KV_ATTR) is kv:
        return
    update = type(cache).update.__get__(cache)

    def quantized_update(key_states, value_states, *args, **kwargs):
        return update(quantize_kv(key_states, kv), quantize_kv(value_states, kv), *args, **kwargs)

    cache.update = quantized_update
    cache.__dict__[KV_ATTR] = kv

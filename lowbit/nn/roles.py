"""Roles of a model's modules that plans refer to by what they do, not by what a model calls them.

``head``
    The output embedding (language-model head, ``proj_out`` of Whisper, ``cls.predictions.decoder`` of BERT):
    the module transformers' ``get_output_embeddings()`` returns; for a model without that method, a module
    called ``lm_head``.
``embedding``
    The input embedding: ``get_input_embeddings()``.

A module reachable under several names has its role under each, and so does a module that shares the
weight tensor of one (T5's ``encoder.embed_tokens`` and ``decoder.embed_tokens`` hold ``shared.weight``: they
are the embedding; a linear holding it is the head). Plans match them with ``role:head`` / ``role:embedding`` (``lowbit.plan``).
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

ROLES = ("head", "embedding")
HEAD_NAME = "lm_head"  # the head of a model that does not report one


def output_embedding(model: nn.Module) -> nn.Module | None:
    """The model's output head: ``get_output_embeddings()``, else a module called ``lm_head``, else None."""
    found = _call(model, "get_output_embeddings")
    if isinstance(found, nn.Module):
        return found
    for name, m in model.named_modules():
        if name == HEAD_NAME or name.endswith("." + HEAD_NAME):
            return m
    return None


def input_embedding(model: nn.Module) -> nn.Module | None:
    """The model's input embedding (``get_input_embeddings()``), or None."""
    found = _call(model, "get_input_embeddings")
    return found if isinstance(found, nn.Module) else None


def module_roles(model: nn.Module) -> dict[str, str]:
    """``{module name: role}`` for every name under which the head or the input embedding is reachable, and for
    the modules that share its weight tensor."""
    emb, head = input_embedding(model), output_embedding(model)
    by_id = {}
    for role, m in (("embedding", emb), ("head", head)):
        if m is not None:
            by_id.setdefault(id(m), role)  # a module that is both (one shared table) counts as the embedding
    weights = {id(w) for w in (_weight(emb), _weight(head)) if w is not None}
    roles = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if id(m) in by_id:
            roles[name] = by_id[id(m)]
        elif _weight(m) is not None and id(_weight(m)) in weights:
            roles[name] = "embedding" if isinstance(m, nn.Embedding) else "head"
    return roles


def tied_head(model: nn.Module) -> bool:
    """True if the output head's weight is the input embedding's weight tensor (a tied head)."""
    w_out, w_in = _weight(output_embedding(model)), _weight(input_embedding(model))
    return w_in is not None and w_in is w_out


def share_quantized_storage(model: nn.Module, head: str, embedding: str) -> bool:
    """Point the quantized ``head``'s weight storage at the quantized ``embedding``'s when both hold the same
    codes and scales (a tied pair quantized alike), so the weight is kept and saved once; False (and both kept)
    when they differ."""
    h, e = model.get_submodule(head), model.get_submodule(embedding)
    names = ("qweight", "scale", "zero_point", "global_scale", "super_scale", "super_min")
    pairs = [(getattr(h, n, None), getattr(e, n, None)) for n in names]
    if not all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in pairs):
        log.warning("the tied head %r and embedding %r were quantized to different codes; both are kept", head,
                    embedding)
        return False
    for n in names:
        if getattr(e, n, None) is not None:
            h._buffers[n] = e._buffers[n]
    log.info("the head %r shares the quantized embedding %r (tied: stored once)", head, embedding)
    return True


def _weight(m: nn.Module | None) -> object:
    """The module's own weight tensor (a quantized module's packed codes), read without computing anything."""
    if m is None:
        return None
    found = m._parameters.get("weight")
    if found is None:
        found = m._buffers.get("weight", m._buffers.get("qweight"))
    return found


def _call(model: nn.Module, method: str) -> object:
    fn = getattr(model, method, None)
    if not callable(fn):
        return None
    try:
        return fn()
    except (NotImplementedError, AttributeError, TypeError):  # transformers raises these for models without one
        return None

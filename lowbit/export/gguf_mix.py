"""llama.cpp's per-tensor type mixes (``Q4_K_M``, ``Q5_K_M``...) as lowbit plans, so that lowbit chooses the values
(GPTQ, AWQ's clipping...) and ``lowbit export --format gguf`` writes a file with llama.cpp's own layout.

llama.cpp's ``llama_tensor_get_type`` (``src/llama-quant.cpp``) picks each tensor's type from the mix's base type,
the tensor's role and its layer; :func:`gguf_mix_plan` follows its rules for dense decoder models:

* the output head (the token embedding when the head is tied to it) gets Q6_K; the token embedding otherwise
  the base type;
* ``attn_v`` and ``ffn_down`` get Q6_K in the layers ``use_more_bits`` picks (the first and last eighth of the
  layers, and every third one between) for the ``_M`` mixes (Q4_K_M, Q5_K_M), else the base type;
* every other linear layer the base type;
* a k-quant type on a tensor whose rows are not a multiple of 256 falls back as llama.cpp's does: Q4_K -> Q5_0,
  Q5_K -> Q5_1, Q6_K -> Q8_0, Q2_K / Q3_K -> Q4_0.

The embedding and the head are quantized by round to nearest (a tied pair then stays one tensor in the file);
every other layer by ``method``. An embedding lowbit does not quantize (Gemma's, which scales its output) stays
float, and so does a head tied to it.
"""

from __future__ import annotations

import logging
from typing import Any

from torch import nn

from lowbit.errors import InputError
from lowbit.nn.convert import is_quantizable
from lowbit.plan import QuantPlan, Rule
from lowbit.spec import GGML_NAMES, SUPER_BLOCK

log = logging.getLogger(__name__)

# mix -> (base type, whether attn_v / ffn_down get Q6_K in the layers use_more_bits picks)
MIXES = {"Q4_K_M": ("Q4_K", True), "Q4_K_S": ("Q4_K", False), "Q5_K_M": ("Q5_K", True), "Q5_K_S": ("Q5_K", False),
         "Q6_K": ("Q6_K", False), "Q8_0": ("Q8_0", False), "Q4_0": ("Q4_0", False)}
FALLBACK = {"Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0", "Q2_K": "Q4_0", "Q3_K": "Q4_0"}
_MORE_BITS = ("v_proj", "down_proj")


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's choice of the layers that get more bits: the first and last eighth, and every third between."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def tensor_type(mix: str, role: str, layer: int | None, n_layers: int, in_features: int) -> str:
    """The GGML type of one tensor under ``mix``: ``role`` is ``"output"``, ``"embedding"`` or the linear's leaf
    name."""
    base, more = MIXES[mix]
    kind = base
    if role == "output" and base != "Q8_0":
        kind = "Q6_K"
    elif more and role in _MORE_BITS and layer is not None and use_more_bits(layer, n_layers):
        kind = "Q6_K"
    if kind.endswith("_K") and in_features % SUPER_BLOCK:
        kind = FALLBACK[kind]
    return kind


def gguf_mix_plan(model: nn.Module, mix: str, method: Any = "rtn", transforms: tuple[str, ...] = ()) -> QuantPlan:
    """A plan giving every linear layer of ``model`` (a decoder-only transformers causal LM with
    ``model.layers``), its embedding and head the lowbit spec of the GGML type ``mix`` gives it, after
    ``transforms`` (e.g. ``("awq_scales",)``: AWQ's scales folded into the norms, which GGUF can hold)."""
    key = mix.upper().replace("-", "_")
    if key not in MIXES:
        raise InputError(f"unknown GGUF mix {mix!r}; known: {', '.join(MIXES)}")
    body = getattr(model, "model", None)
    layers = getattr(body, "layers", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = getattr(model, "lm_head", None)
    if layers is None or not isinstance(emb, nn.Embedding) or not isinstance(head, nn.Linear):
        raise InputError(f"a GGUF mix plan needs a decoder-only causal LM with model.layers, an embedding and an "
                         f"lm_head; this {type(model).__name__} is not one")
    names = {m: n for n, m in model.named_modules()}
    tied = head.weight is emb.weight
    n = len(layers)

    def spec(kind: str) -> str:
        return GGML_NAMES[kind.lower().replace("_", "-")]

    rules = []
    if is_quantizable(emb):
        rules.append(Rule(names[head], spec(tensor_type(key, "output", None, n, head.in_features))))
        role = "output" if tied else "embedding"
        rules.append(Rule(names[emb], spec(tensor_type(key, role, None, n, emb.embedding_dim))))
    else:  # Gemma's scaled embedding: float, and a head tied to it too (else the file would hold both)
        log.warning("%s (%s) is not a layer lowbit quantizes: it stays float in the mix%s", names[emb],
                    type(emb).__name__, ", with the head tied to it" if tied else "")
        if not tied:
            rules.append(Rule(names[head], spec(tensor_type(key, "output", None, n, head.in_features))))
    for i, layer in enumerate(layers):
        for sub in layer.modules():
            if isinstance(sub, nn.Linear):
                leaf = names[sub].rsplit(".", 1)[-1]
                rules.append(Rule(names[sub], spec(tensor_type(key, leaf, i, n, sub.in_features)), method))
    return QuantPlan(tuple(rules), skip=() if is_quantizable(emb) else (names[emb],), transforms=tuple(transforms))

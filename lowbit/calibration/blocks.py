"""Find a model's repeated blocks (the decoder layers of a transformer) from its module tree alone.

No per-architecture table: the blocks are the children of the ``nn.ModuleList`` that holds the most
parameters among those whose children are at least two modules of one class, each containing a layer
lowbit quantizes. That is ``model.layers`` in Llama/Gemma/Qwen/Mistral, ``transformer.h`` in GPT-2,
``model.decoder.layers`` in OPT, ``encoder.layer`` in BERT, and nothing in a plain CNN.
"""

from __future__ import annotations

from torch import nn

from lowbit.nn.convert import is_quantizable


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``[(dotted name, block), ...]`` in execution order, or ``[]`` when the model has no repeated blocks."""
    best: list[tuple[str, nn.Module]] = []
    best_params = 0
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        kinds = {type(c) for c in m}
        if len(kinds) != 1 or not all(any(is_quantizable(s) for s in c.modules()) for c in m):
            continue
        params = sum(p.numel() for p in m.parameters())
        if params > best_params:
            prefix = f"{name}." if name else ""
            best, best_params = [(f"{prefix}{i}", c) for i, c in enumerate(m)], params
    return best

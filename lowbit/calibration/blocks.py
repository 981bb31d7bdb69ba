"""Find a model's stacks of repeated blocks (transformer layers) from its module tree alone.

No per-architecture table: a *stack* is an ``nn.ModuleList`` whose children are at least two modules of one
class, each containing a layer lowbit quantizes, and that lies inside no other such list. That is
``model.layers`` in Llama/Gemma/Qwen/Mistral, ``transformer.h`` in GPT-2, ``model.decoder.layers`` in OPT,
``encoder.layer`` in BERT, ``encoder.block`` and ``decoder.block`` in T5, ``model.encoder.layers`` and
``model.decoder.layers`` in Whisper and BART, and nothing in a plain CNN. :func:`find_blocks` is the stack
holding the most parameters (the one the architecture tables and transforms work on);
``lowbit.calibration.sequential.first_calls`` finds the order a forward pass runs stacks and other layers in.
"""

from __future__ import annotations

from torch import nn

from lowbit.nn.convert import is_quantizable

Stack = list[tuple[str, nn.Module]]  # [(dotted block name, block), ...] in index order


def find_stacks(model: nn.Module) -> list[Stack]:
    """Every stack of repeated blocks (see the module docstring), outermost only, in module order."""
    found: list[tuple[str, nn.ModuleList]] = []
    for name, m in model.named_modules():
        if not isinstance(m, nn.ModuleList) or len(m) < 2:
            continue
        if len({type(c) for c in m}) != 1 or not all(any(is_quantizable(s) for s in c.modules()) for c in m):
            continue
        if any(name.startswith(f"{outer}.") or outer == "" for outer, _ in found):
            continue  # a list inside a block of a stack already found (named_modules visits parents first)
        found.append((name, m))
    return [[(f"{name}.{i}" if name else str(i), c) for i, c in enumerate(m)] for name, m in found]


def find_blocks(model: nn.Module) -> Stack:
    """The stack holding the most parameters, ``[(dotted name, block), ...]`` in execution order, or ``[]``
    when the model has no repeated blocks."""
    stacks = find_stacks(model)
    if not stacks:
        return []
    return max(stacks, key=lambda s: sum(p.numel() for _, b in s for p in b.parameters()))

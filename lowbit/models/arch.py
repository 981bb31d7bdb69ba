"""Architecture facts as data: which norm feeds which linear layers, per model family.

Each :class:`Family` is a table entry keyed by module-name patterns *relative to one repeated block* (the
blocks themselves are found from the module tree by ``lowbit.calibration.blocks.find_blocks``), plus the
final norm (relative to the module that holds the blocks) and the head it feeds (relative to the root).
:func:`norm_groups` picks the family from ``model.config.model_type``, expands the table over the blocks and
checks every pair against the real model: the norm exists and is of the family's norm class, each linear
exists and takes the norm's width, no linear is claimed twice, and (on a 4-token forward pass) each linear
really receives the norm's output. Anything that does not fit is an InputError naming the module.

| family | model_type  | inside each block: norm -> linears                                  |
|--------|-------------|---------------------------------------------------------------------|
| llama  | llama       | input_layernorm -> q/k/v_proj; post_attention_layernorm -> gate/up   |
| gemma3 | gemma3_text | input_layernorm -> q/k/v_proj; pre_feedforward_layernorm -> gate/up  |
| gpt2   | gpt2        | ln_1 -> attn.c_attn; ln_2 -> mlp.c_fc                                |
| opt    | opt         | self_attn_layer_norm -> q/k/v_proj; final_layer_norm -> fc1          |

and the final norm (``norm``, ``ln_f``, ``final_layer_norm``) -> ``lm_head`` where the model has one.

Gemma-3's RMSNorm scales by ``1 + weight`` (``gain_offset`` 1); its post-attention / post-feedforward norms
write into the residual stream and its q/k norms feed the rotary embedding, so no linear follows them (they
are listed as ``kept`` and only checked to exist). OPT's norms feed the linears only when
``config.do_layer_norm_before`` (OPT-350m has it False: refused).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.nn.convert import float_weight, is_linear_like

log = logging.getLogger(__name__)

PROBE_TOKENS = 4  # length of the forward pass that checks who receives each norm's output


@dataclass(frozen=True)
class Feeds:
    """A norm and the linear layers that read its output (names relative to a block, see the module doc)."""

    norm: str
    linears: tuple[str, ...]


@dataclass(frozen=True)
class Family:
    """One family's table entry."""

    model_types: tuple[str, ...]      # ``config.model_type`` values
    norm_classes: tuple[str, ...]     # class names its norms must have
    gain_offset: float                # the norm multiplies by ``gain_offset + weight``
    in_block: tuple[Feeds, ...]
    final: Feeds                      # norm relative to the blocks' parent module; linears relative to the root
    kept: tuple[str, ...] = ()        # block norms that feed no linear (they keep their gain)
    requires: tuple[str, ...] = ()    # config flags that must be true for ``in_block`` to hold
    # the residual stream (for rotations): the embeddings that start it (relative to the blocks' parent), the
    # linears in each block that write into it, the block linears whose input may be rotated online (an
    # nn.Linear each), and why no rotation can pass the stream, where none can
    embeddings: tuple[str, ...] = ()
    writers: tuple[str, ...] = ()
    online: tuple[str, ...] = ()
    no_residual_rotation: str | None = None
    # (producer, consumer) linears in each block whose channels a per-channel scale may move between
    # (SmoothQuant): the consumer's input is linear in the producer's output
    smooth_linears: tuple[tuple[str, str], ...] = ()


_QKV = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
_GATE_UP = ("mlp.gate_proj", "mlp.up_proj")

_LAYERNORM_STREAM = ("{norm} is a LayerNorm: it subtracts each token's mean, which does not commute with a "
                     "rotation of the residual stream (the stream would first have to be centered in every "
                     "writer, not built yet)")

FAMILIES: dict[str, Family] = {
    "llama": Family(("llama",), ("LlamaRMSNorm",), 0.0,
                    (Feeds("input_layernorm", _QKV), Feeds("post_attention_layernorm", _GATE_UP)),
                    Feeds("norm", ("lm_head",)),
                    embeddings=("embed_tokens",), writers=("self_attn.o_proj", "mlp.down_proj"),
                    online=("self_attn.o_proj", "mlp.down_proj"),
                    smooth_linears=(("mlp.up_proj", "mlp.down_proj"),)),
    "gemma3": Family(("gemma3_text",), ("Gemma3RMSNorm",), 1.0,
                     (Feeds("input_layernorm", _QKV), Feeds("pre_feedforward_layernorm", _GATE_UP)),
                     Feeds("norm", ("lm_head",)),
                     kept=("post_attention_layernorm", "post_feedforward_layernorm", "self_attn.q_norm",
                           "self_attn.k_norm"),
                     online=("mlp.down_proj",), smooth_linears=(("mlp.up_proj", "mlp.down_proj"),),
                     no_residual_rotation="{block}.post_attention_layernorm normalizes o_proj's output and scales "
                                          "it by a per-channel gain before it joins the residual stream; a "
                                          "rotated stream cannot pass that gain"),
    "gpt2": Family(("gpt2",), ("LayerNorm",), 0.0,
                   (Feeds("ln_1", ("attn.c_attn",)), Feeds("ln_2", ("mlp.c_fc",))),
                   Feeds("ln_f", ("lm_head",)),
                   no_residual_rotation=_LAYERNORM_STREAM.format(norm="{block}.ln_1")),
    "opt": Family(("opt",), ("LayerNorm",), 0.0,
                  (Feeds("self_attn_layer_norm", _QKV), Feeds("final_layer_norm", ("fc1",))),
                  Feeds("final_layer_norm", ("lm_head",)), requires=("do_layer_norm_before",),
                  online=("fc2",),
                  no_residual_rotation=_LAYERNORM_STREAM.format(norm="{block}.self_attn_layer_norm")),
}


@dataclass(frozen=True)
class NormGroup:
    """One norm of a model and the linear layers that read its output (full dotted names)."""

    norm: str
    linears: tuple[str, ...]
    gain_offset: float  # the norm's effective gain is ``gain_offset + norm.weight``


def norm_groups(model: nn.Module, probe: bool = True) -> list[NormGroup]:
    """Every (norm -> linears) pair of ``model``, in module order, checked against its module tree.

    The final norm's pair is left out when the model has no such norm or no head (a base model). With
    ``probe``, one forward pass on ``PROBE_TOKENS`` token ids checks that each linear receives its norm's
    output and nothing else. Raises InputError for an unknown family or a model that does not fit.
    """
    from lowbit.calibration.blocks import find_blocks  # lazy: ``lowbit.models`` loads no calibration code

    name, family = family_of(model)
    _check_config(model, name, family)
    blocks = find_blocks(model)
    if not blocks:
        raise InputError(f"{type(model).__name__} ({name}): no repeated blocks found; the {name} table needs "
                         f"its decoder layers")
    modules = dict(model.named_modules())
    groups = [NormGroup(f"{b}.{f.norm}", tuple(f"{b}.{x}" for x in f.linears), family.gain_offset)
              for b, _ in blocks for f in family.in_block]
    for b, _ in blocks:
        for rel in family.kept:
            _check_norm(modules, f"{b}.{rel}", name, family)
    container = blocks[0][0].rsplit(".", 1)[0]
    parent = container.rsplit(".", 1)[0] + "." if "." in container else ""
    final = NormGroup(parent + family.final.norm, family.final.linears, family.gain_offset)
    if final.norm in modules and all(x in modules for x in final.linears):
        groups.append(final)
    else:
        log.debug("%s: no final norm %s feeding %s; not a group", name, final.norm, final.linears)
    for g in groups:
        _check_group(modules, g, name, family)
    _check_claimed_once(groups)
    if probe:
        _probe(model, modules, groups, name)
    return groups


def family_of(model: nn.Module) -> tuple[str, Family]:
    """The table entry for ``model.config.model_type``; InputError listing the known families otherwise."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for name, family in FAMILIES.items():
        if model_type in family.model_types:
            return name, family
    known = ", ".join(f"{n} ({'/'.join(f.model_types)})" for n, f in FAMILIES.items())
    raise InputError(f"{type(model).__name__}: model_type {model_type!r} is not in lowbit's architecture table "
                     f"(lowbit/models/arch.py); known families: {known}")


# ---------------------------------------------------------------------------------------------
# helpers


def _check_config(model: nn.Module, name: str, family: Family) -> None:
    for flag in family.requires:
        if not getattr(model.config, flag, False):
            raise InputError(f"{type(model).__name__}: config.{flag} is False, so its norms "
                             f"({', '.join(f.norm for f in family.in_block)}) do not feed the {name} table's "
                             f"linears; this model cannot be transformed: leave the transform out of the plan")


def _check_norm(modules: dict[str, nn.Module], norm: str, name: str, family: Family) -> int:
    """The width of norm ``norm``, checked to exist and to be of the family's norm class."""
    m = modules.get(norm)
    if m is None:
        raise InputError(f"module {norm!r} not found: the {name} table expects a norm there "
                         f"({'/'.join(family.norm_classes)}); this model does not fit lowbit/models/arch.py")
    if type(m).__name__ not in family.norm_classes:
        raise InputError(f"module {norm!r} is a {type(m).__name__}, not a {'/'.join(family.norm_classes)} as the "
                         f"{name} table expects; this model does not fit lowbit/models/arch.py")
    weight = getattr(m, "weight", None)
    return int(weight.shape[-1]) if weight is not None else int(m.normalized_shape[-1])


def _check_group(modules: dict[str, nn.Module], g: NormGroup, name: str, family: Family) -> None:
    width = _check_norm(modules, g.norm, name, family)
    for lin in g.linears:
        m = modules.get(lin)
        if m is None or not is_linear_like(m):
            what = "not found" if m is None else f"a {type(m).__name__}, not a linear layer"
            raise InputError(f"module {lin!r} is {what}: the {name} table says {g.norm!r} feeds it; this model "
                             f"does not fit lowbit/models/arch.py")
        got = float_weight(m).shape[1]  # lowbit layout (out, in)
        if got != width:
            raise InputError(f"module {lin!r} takes {got} inputs but {g.norm!r} puts out {width}: it cannot "
                             f"read that norm; this model does not fit the {name} table")


def _check_claimed_once(groups: list[NormGroup]) -> None:
    owner: dict[str, str] = {}
    for g in groups:
        for lin in g.linears:
            if lin in owner:
                raise InputError(f"module {lin!r} is fed by both {owner[lin]!r} and {g.norm!r} in the table")
            owner[lin] = g.norm


def _probe(model: nn.Module, modules: dict[str, nn.Module], groups: list[NormGroup], name: str) -> None:
    """Run ``PROBE_TOKENS`` tokens; every call of each linear must receive an output of its norm."""
    outs: dict[str, list[torch.Tensor]] = {g.norm: [] for g in groups}
    ins: dict[str, list[torch.Tensor]] = {x: [] for g in groups for x in g.linears}
    handles = [modules[n].register_forward_hook(lambda m, a, out, n=n: outs[n].append(out)) for n in outs]
    handles += [modules[n].register_forward_pre_hook(lambda m, a, n=n: ins[n].append(a[0])) for n in ins]
    vocab = int(getattr(model.config, "vocab_size", PROBE_TOKENS + 1))
    device = next(model.parameters()).device
    ids = (torch.arange(1, PROBE_TOKENS + 1, device=device) % vocab)[None]  # (1, PROBE_TOKENS)
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        for h in handles:
            h.remove()
    for g in groups:
        for lin in g.linears:
            if not ins[lin]:
                raise InputError(f"module {lin!r} did not run in a {PROBE_TOKENS}-token forward pass; the {name} "
                                 f"table says {g.norm!r} feeds it: this model does not fit lowbit/models/arch.py")
            for x in ins[lin]:
                if not any(y.shape == x.shape and torch.equal(y, x) for y in outs[g.norm]):
                    raise InputError(f"module {lin!r} receives something other than the output of {g.norm!r} "
                                     f"(checked on a {PROBE_TOKENS}-token forward pass): this model does not fit "
                                     f"the {name} table in lowbit/models/arch.py")


# ---------------------------------------------------------------------------------------------
# the residual stream, for rotations


@dataclass(frozen=True)
class ResidualStream:
    """Every module that reads or writes a model's residual stream (full dotted names), checked against it.

    A rotation ``Q`` of the stream (``x -> x Q``) is exact when the embeddings are multiplied by ``Q``, every
    reader's weight ``W`` (out, width) becomes ``W Q``, every writer's ``W`` (width, in) and bias become
    ``Q^T W`` and ``Q^T b``, and every norm on the stream has unit gain (``fuse_norms`` first): RMSNorm
    commutes with an orthogonal ``Q``.
    """

    width: int
    embeddings: tuple[str, ...]
    readers: tuple[str, ...]
    writers: tuple[str, ...]
    norms: tuple[str, ...]
    gain_offset: float


def residual_stream(model: nn.Module) -> ResidualStream:
    """The residual stream of ``model`` from its family's table, checked: InputError naming the module where the
    model does not fit, where the family's stream cannot be rotated, or where the model has no head (its
    output would be the rotated stream itself)."""
    from lowbit.calibration.blocks import find_blocks  # lazy, as in norm_groups

    name, family = family_of(model)
    blocks = find_blocks(model)
    if family.no_residual_rotation is not None:
        where = blocks[0][0] if blocks else "its first block"
        raise InputError(f"{type(model).__name__} ({name}): its residual stream cannot be rotated: "
                         f"{family.no_residual_rotation.format(block=where)}. Rotate each block linear's input "
                         f"online instead (transform 'rotate_inputs')")
    groups = norm_groups(model)
    modules = dict(model.named_modules())
    container = blocks[0][0].rsplit(".", 1)[0]
    parent = container.rsplit(".", 1)[0] + "." if "." in container else ""
    final = f"{parent}{family.final.norm}"
    if not any(g.norm == final for g in groups):
        raise InputError(f"{type(model).__name__} ({name}): no head reads {final!r}, so the model's output is the "
                         f"residual stream itself and a rotation would change it; rotate the model with its head")
    width = _check_norm(modules, groups[0].norm, name, family)
    embeddings = tuple(parent + e for e in family.embeddings)
    for e in embeddings:
        m = modules.get(e)
        if not isinstance(m, nn.Embedding) or m.embedding_dim != width:
            what = "not found" if m is None else f"a {type(m).__name__} of width {getattr(m, 'embedding_dim', '?')}"
            raise InputError(f"module {e!r} is {what}: the {name} table says it starts the residual stream of "
                             f"width {width}; this model does not fit lowbit/models/arch.py")
    writers = tuple(f"{b}.{w}" for b, _ in blocks for w in family.writers)
    for w in writers:
        m = modules.get(w)
        if m is None or not is_linear_like(m) or float_weight(m).shape[0] != width:
            what = "not found" if m is None else (f"a {type(m).__name__}" if not is_linear_like(m) else
                                                  f"a linear with {float_weight(m).shape[0]} outputs")
            raise InputError(f"module {w!r} is {what}: the {name} table says it writes the residual stream of "
                             f"width {width}; this model does not fit lowbit/models/arch.py")
    readers = tuple(x for g in groups for x in g.linears)
    return ResidualStream(width, embeddings, readers, writers, tuple(g.norm for g in groups), family.gain_offset)


def online_linears(model: nn.Module) -> list[str]:
    """The block linears whose input the family's table lets a rotation run online on (``Family.online``),
    checked to exist and to be linear layers."""
    from lowbit.calibration.blocks import find_blocks

    name, family = family_of(model)
    modules = dict(model.named_modules())
    out = [f"{b}.{rel}" for b, _ in find_blocks(model) for rel in family.online]
    for n in out:
        m = modules.get(n)
        if m is None or not is_linear_like(m):
            what = "not found" if m is None else f"a {type(m).__name__}"
            raise InputError(f"module {n!r} is {what}: the {name} table rotates its input online, which needs a "
                             f"linear layer; this model does not fit lowbit/models/arch.py")
    return out

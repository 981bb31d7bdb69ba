"""Hadamard rotations of a float model (QuaRot, SpinQuant; incoherence processing as in QuIP#).

An orthogonal ``Q`` spreads each outlier channel over all channels, so the rotated weights and activations
have no few huge coordinates left and quantize far better at 4 bits and below, while ``x Q (W Q)^T = x W^T``
keeps the model's outputs (Ashkboos et al. 2024, "QuaRot", sections 3-4; Liu et al. 2024, "SpinQuant").

Three transforms (names for ``plan.transforms``):

``rotate_residual``
    The residual stream rotated *offline* by a randomized Hadamard ``Q = H diag(s) / sqrt(d)`` (a Haar-random
    orthogonal matrix where ``d`` is no Hadamard order lowbit builds): embeddings ``E Q``; every linear that
    reads the stream ``W Q``; every linear that writes it ``Q^T W`` (and ``Q^T b``). It runs ``fuse_norms``
    first (an RMSNorm commutes with ``Q`` only at unit gain) and unties a head that shares its weight with
    the embedding (the head then needs the final norm's gain, the embedding must not get it): the untied head
    is stored separately. No computation is added at run time, so the result exports to GGUF like any model.
``rotate``
    ``rotate_residual`` plus an *online* Hadamard on the input of the linears the architecture table lists
    (``Family.online``: the attention output projection and the MLP's down projection), whose inputs no
    earlier layer can rotate for them (they follow the attention's softmax mixing of values per head, and an
    elementwise product): the layer becomes a
    ``lowbit.nn.RotatedLinear`` (quantized: ``QuantLinear(input_rotation=n)``) that applies the fast transform
    to its input (O(n log n)), its weight rotated to match. This is QuaRot's weight and activation layout
    (one full-width Hadamard on the attention output's input where QuaRot splits it into a per-head rotation
    of the values and an online one across heads; keys are not rotated).
``rotate_inputs``
    For architectures whose residual stream a rotation cannot pass (Gemma-3's norms after each sublayer scale
    its output per channel before it joins the stream; GPT-2 and OPT subtract each token's mean): an online
    Hadamard on the input of *every* linear layer inside the repeated blocks (a transformers ``Conv1D``
    becomes a ``RotatedLinear`` with its weight transposed). Exact for any architecture; costs one fast
    transform per linear call.

Which widths: online rotations need a Hadamard order of the layer's input width (``2^k * m``, ``m`` a base
order in ``lowbit.hadamard``: 576, 640, 1536, 2048, 3072, 4096, ... are fine); a width that is not one is
refused with an InputError naming the module and the width and the nearest widths that work. The offline
residual rotation takes any width.

Each transform ends by checking the model on a 4-token forward pass: logits that moved by more than float
rounding (relative 1e-3) mean the model does not fit the table, and the change is undone with an InputError.
The random signs come from a fixed seed, so the same model always gets the same rotation.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.hadamard import is_hadamard_width, random_hadamard, random_orthogonal
from lowbit.nn.convert import float_weight, is_linear_like
from lowbit.nn.rotation import RotatedLinear, check_rotation, rotate_weight_columns

if TYPE_CHECKING:
    from lowbit.transforms import Originals

log = logging.getLogger(__name__)

SEED = 0  # the random signs of the residual rotation
CHECK_TOKENS = 4
# the largest relative change of the logits the check accepts: fp32 rounding moves them ~1e-6, bf16/fp16 weights
# ~1e-2; a reader or writer the table misses moves them by order 1
CHECK_RTOL = {torch.float64: 1e-3, torch.float32: 1e-3, torch.float16: 0.25, torch.bfloat16: 0.25}


def rotate_residual(model: nn.Module, originals: "Originals | None" = None) -> nn.Module:
    """Rotate ``model``'s residual stream offline (see the module docstring); in place, returned."""
    return _checked(model, originals, lambda o: _rotate_residual(model, o))


def rotate(model: nn.Module, originals: "Originals | None" = None) -> nn.Module:
    """``rotate_residual`` plus online Hadamards on the inputs the architecture table lists."""
    from lowbit.models.arch import online_linears, residual_stream  # lazy: models is a later stage

    residual_stream(model)  # refuse a model whose stream cannot be rotated before anything changes
    names = online_linears(model)
    _check_online_widths(model, names)

    def run(o: "Originals") -> None:
        _rotate_residual(model, o)
        _rotate_online(model, names, o)
    return _checked(model, originals, run)


def rotate_inputs(model: nn.Module, originals: "Originals | None" = None) -> nn.Module:
    """An online Hadamard on the input of every ``nn.Linear`` inside ``model``'s repeated blocks."""
    names = block_linears(model)
    _check_online_widths(model, names)
    return _checked(model, originals, lambda o: _rotate_online(model, names, o))


def block_linears(model: nn.Module) -> list[str]:
    """Every linear layer (``nn.Linear``, transformers' ``Conv1D``, or an already rotated one) inside
    ``model``'s repeated blocks; InputError when there are none."""
    from lowbit.calibration.blocks import find_blocks  # lazy: calibration is a later stage than transforms

    blocks = find_blocks(model)
    if not blocks:
        raise InputError(f"{type(model).__name__}: no repeated blocks found; rotate_inputs rotates the linears "
                         f"inside a model's repeated blocks")
    out = [f"{b}.{rel}" for b, block in blocks for rel, m in block.named_modules() if rel and is_linear_like(m)]
    if not out:
        raise InputError(f"{type(model).__name__}: its repeated blocks hold no linear layer to rotate")
    return out


# ---- rebuilding the structure of a saved model ---------------------------------------------------------------


def rebuild_rotate(model: nn.Module, keys: set[str]) -> None:
    """Give the freshly built float architecture of a model saved after ``rotate`` its structure: the untied
    head and the rotated linears (weights come from the file afterwards; works on ``meta`` tensors)."""
    from lowbit.models.arch import online_linears

    _untie_head_if_saved(model, keys)
    _swap_rotated(model, online_linears(model))


def rebuild_rotate_residual(model: nn.Module, keys: set[str]) -> None:
    _untie_head_if_saved(model, keys)


def rebuild_rotate_inputs(model: nn.Module, keys: set[str]) -> None:
    _swap_rotated(model, block_linears(model))


# ---- helpers ---------------------------------------------------------------------------------------------------


def _checked(model: nn.Module, originals: "Originals | None", change) -> nn.Module:
    """Run ``change(originals)`` and check the logits on ``CHECK_TOKENS`` tokens; undo and raise if they moved."""
    from lowbit.transforms import Originals

    own = Originals()
    ids = _probe_ids(model)
    before = _logits(model, ids)
    try:
        change(own)
        after = _logits(model, ids)
        moved = float((after - before).abs().max() / before.abs().max().clamp_min(1e-30))
        dtype = next(model.parameters()).dtype
        if not moved <= CHECK_RTOL.get(dtype, 1e-3):  # NaN included
            raise InputError(f"{type(model).__name__}: after the rotation its logits moved by {moved:.2g} (relative, "
                             f"on a {CHECK_TOKENS}-token check), more than float rounding: the model does not fit "
                             f"lowbit/models/arch.py (a layer reads or writes the residual stream that the table "
                             f"does not list)")
    except BaseException:
        own.restore()
        raise
    if originals is not None:
        originals.absorb(own)
    return model


def _probe_ids(model: nn.Module) -> torch.Tensor:
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", CHECK_TOKENS + 1))
    device = next(model.parameters()).device
    return (torch.arange(1, CHECK_TOKENS + 1, device=device) % vocab)[None]  # (1, CHECK_TOKENS)


def _logits(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids)
    t = getattr(out, "logits", None)
    if t is None:
        t = getattr(out, "last_hidden_state", out[0] if isinstance(out, (tuple, list)) else out)
    return t.detach().double()


def _rotate_residual(model: nn.Module, originals: "Originals") -> None:
    from lowbit.models.arch import residual_stream
    from lowbit.transforms.fuse_norms import fuse_norms

    stream = residual_stream(model)  # before anything changes: refuses unknown or unfit models
    _untie_head(model, originals)
    fuse_norms(model, originals)
    modules = dict(model.named_modules())
    for n in stream.norms:  # every norm on the stream must now be a pure normalization
        w = getattr(modules[n], "weight", None)
        if w is not None and not bool((w.detach().double() + stream.gain_offset == 1.0).all()):
            raise InputError(f"module {n!r} keeps a gain after fuse_norms, which a rotated stream cannot pass")
    d = stream.width
    Q = random_hadamard(d, SEED, torch.float64) if is_hadamard_width(d) else random_orthogonal(d, SEED)
    kind = "randomized Hadamard" if is_hadamard_width(d) else "random orthogonal (no Hadamard of this order)"
    with torch.no_grad():
        for e in stream.embeddings:
            _set(modules[e], "weight", modules[e].weight.detach().double() @ Q, originals)  # (vocab, d) Q
        for r in stream.readers:
            lin = modules[r]
            _set_linear(lin, float_weight(lin).double() @ Q, originals)  # (out, d) Q
        for w in stream.writers:
            lin = modules[w]
            _set_linear(lin, Q.T @ float_weight(lin).double(), originals)  # Q^T (d, in)
            if lin.bias is not None:
                _set(lin, "bias", Q.T @ lin.bias.detach().double(), originals)
    log.info("rotated the residual stream (width %d, %s) through %d embedding(s), %d reader(s), %d writer(s)",
             d, kind, len(stream.embeddings), len(stream.readers), len(stream.writers))


def _rotate_online(model: nn.Module, names: list[str], originals: "Originals") -> None:
    """Replace each linear of ``names`` by a RotatedLinear with its weight rotated (the old module is kept)."""
    modules = dict(model.named_modules())
    with torch.no_grad():
        for n in names:
            lin = modules[n]
            if isinstance(lin, RotatedLinear):
                raise InputError(f"module {n!r} is already rotated online; list one rotation transform only")
            w = float_weight(lin)  # (out, in)
            size = w.shape[1]
            rotated = rotate_weight_columns(w.double(), size).to(w.dtype)
            parent, _, child = n.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            originals.keep_object(owner, child)
            setattr(owner, child, RotatedLinear.from_weight(rotated, lin.bias, size).train(lin.training))
    log.info("online Hadamard on the input of %d linear layer(s)", len(names))


def _check_online_widths(model: nn.Module, names: list[str]) -> None:
    for n in names:
        width = float_weight(model.get_submodule(n)).shape[1]
        check_rotation(width, width, f"module {n!r} (input width {width})")


def _swap_rotated(model: nn.Module, names: list[str]) -> None:
    for n in names:
        lin = model.get_submodule(n)
        if isinstance(lin, RotatedLinear):
            continue
        parent, _, child = n.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child,
                RotatedLinear.like(lin, float_weight(lin).shape[1]))


def _head_and_embedding(model: nn.Module) -> tuple[nn.Module | None, nn.Module | None]:
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    return (get_out() if callable(get_out) else None), (get_in() if callable(get_in) else None)


def _untie_head(model: nn.Module, originals: "Originals") -> None:
    head, emb = _head_and_embedding(model)
    if head is None or emb is None or head.weight is not emb.weight:
        return
    originals.keep_object(head, "weight")
    head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=head.weight.requires_grad)
    if getattr(model, "config", None) is not None and getattr(model.config, "tie_word_embeddings", False):
        originals.keep_object(model.config, "tie_word_embeddings")
        model.config.tie_word_embeddings = False  # so transformers does not tie them again
    log.info("untied the head from the embedding: the head takes the final norm's gain, so it is stored "
             "separately (%d more float values)", head.weight.numel())


def _untie_head_if_saved(model: nn.Module, keys: set[str]) -> None:
    head, emb = _head_and_embedding(model)
    if head is None or emb is None or head.weight is not emb.weight:
        return
    names = {id(m): n for n, m in model.named_modules()}
    if f"{names.get(id(head))}.weight" in keys and f"{names.get(id(emb))}.weight" in keys:
        head.weight = nn.Parameter(torch.empty_like(head.weight), requires_grad=False)
        if getattr(model, "config", None) is not None and getattr(model.config, "tie_word_embeddings", False):
            model.config.tie_word_embeddings = False


def _set(module: nn.Module, key: str, value: torch.Tensor, originals: "Originals") -> None:
    originals.keep(module, key)
    t = getattr(module, key)
    t.copy_(value.to(t.dtype))


def _set_linear(lin: nn.Module, w: torch.Tensor, originals: "Originals") -> None:
    """Store ``w`` (lowbit layout ``(out, in)``) as ``lin``'s weight (transposed for transformers' Conv1D)."""
    originals.keep(lin, "weight")
    transposed = not isinstance(lin, nn.Linear)
    lin.weight.copy_((w.T if transposed else w).to(lin.weight.dtype))

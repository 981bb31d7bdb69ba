"""Fuse each norm's gain (and LayerNorm's bias) into the linear layers that read its output.

A norm ends in an affine map of its normalized input ``xhat`` (RMSNorm: ``y = xhat * g``; LayerNorm:
``y = xhat * g + b``), and a linear ``W, c`` that reads ``y`` computes ``W y + c = (W diag(g)) xhat + (W b + c)``.
So ``W' = W * g[None, :]``, ``c' = c + W @ b`` and a norm with ``g = 1, b = 0`` give the same outputs up to
float rounding. This is the first equivalence transform of QuaRot / SpinQuant style pipelines (Ashkboos et
al. 2024, section 4: "fusing the RMSNorm scale into the following weights"): afterwards the norm is a pure
normalization, which rotations and smoothing scales can pass.

Which norm feeds which linears comes from the architecture table (``lowbit.models.arch``), checked against
the model. What is refused or skipped:

* a head whose weight is tied to an ``nn.Embedding`` (GPT-2, OPT, Gemma-3: ``lm_head`` shares
  ``embed_tokens``): fusing would change the embedding too, so that pair is **skipped** (logged) and the final
  norm keeps its gain. Nothing is untied.
* any other weight shared with a module outside the pair, and a linear fed by something besides its norm
  (found by ``norm_groups``' forward-pass check): **refused** with an InputError naming the module.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch
from torch import nn

from lowbit.errors import InputError

if TYPE_CHECKING:
    from lowbit.models.arch import NormGroup
    from lowbit.transforms import Originals

log = logging.getLogger(__name__)


def fuse_norms(model: nn.Module, originals: "Originals | None" = None) -> nn.Module:
    """Rewrite the float ``model`` in place into an equivalent one whose norms have unit gain; return it.

    Every norm -> linears pair of ``lowbit.models.arch.norm_groups(model)`` is fused in float64 and cast back
    to each tensor's dtype. ``originals``, if given, keeps every tensor before it is changed (for undo).
    Raises InputError (before anything changes) for an unknown family, a model that does not fit the table, or
    a weight shared outside its pair other than a tied head (which is skipped, see the module docstring).
    """
    from lowbit.models.arch import norm_groups  # lazy: quantize() runs this, and models is a later stage

    modules = dict(model.named_modules())
    owners = _owners(model)
    groups = [g for g in norm_groups(model) if not _tied_head(g, modules, owners)]
    with torch.no_grad():
        for g in groups:
            _fuse_group(g, modules, originals)
    log.info("fused the gains of %d norm(s) into the linear layers they feed", len(groups))
    return model


def rebuild_fuse_norms(model: nn.Module, keys: set[str]) -> None:
    """Give each linear of the architecture table that ``fuse_norms`` gave a bias (a LayerNorm's shift fused
    into a linear without one) that bias again, where the saved ``keys`` hold it (the model may be on ``meta``)."""
    from lowbit.models.arch import norm_groups

    modules = dict(model.named_modules())
    for g in norm_groups(model, probe=False):
        for name in g.linears:
            lin = modules[name]
            if getattr(lin, "bias", None) is None and f"{name}.bias" in keys:
                w = lin.weight
                out = w.shape[1] if not isinstance(lin, nn.Linear) else w.shape[0]  # Conv1D stores (in, out)
                lin.bias = nn.Parameter(torch.zeros(out, dtype=w.dtype, device=w.device), requires_grad=False)


def fuse_affine(W: torch.Tensor, c: torch.Tensor | None, g: torch.Tensor,
                b: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(W', c')`` with ``W' x + c' == W (x * g + b) + c`` for every ``x``; float64 math, cast back.

    W: (out, in); c: (out,) or None; g: (in,); b: (in,) or None. ``c'`` is None when ``c`` and ``b`` are.
    """
    W64 = W.double()                                 # (out, in)
    W_new = (W64 * g.double()[None, :]).to(W.dtype)  # (out, in)
    if b is None:
        return W_new, c
    c64 = W64 @ b.double()                           # (out,)
    if c is not None:
        c64 = c64 + c.double()
    return W_new, c64.to(W.dtype if c is None else c.dtype)


# ---------------------------------------------------------------------------------------------
# helpers


def _fuse_group(g: "NormGroup", modules: dict[str, nn.Module], originals: "Originals | None") -> None:
    norm = modules[g.norm]
    weight, bias = getattr(norm, "weight", None), getattr(norm, "bias", None)
    if weight is None and bias is None:
        return  # a norm without affine parameters: nothing to fuse
    gain = weight.detach().double() + g.gain_offset if weight is not None else None  # (in,)
    shift = bias.detach() if bias is not None and bool(bias.ne(0).any()) else None     # (in,) or None
    for name in g.linears:
        _fuse_linear(modules[name], gain, shift, originals)
    for key, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            if originals is not None:
                originals.keep(norm, key)
            t.fill_(1.0 - g.gain_offset if key == "weight" else 0.0)  # unit gain: weight 1 (Gemma-3: 0), bias 0


def _fuse_linear(lin: nn.Module, gain: torch.Tensor | None, shift: torch.Tensor | None,
                 originals: "Originals | None") -> None:
    if originals is not None:
        originals.keep(lin, "weight")
        originals.keep(lin, "bias")
    stored = lin.weight
    transposed = not isinstance(lin, nn.Linear)  # transformers' Conv1D stores (in, out)
    W = stored.detach().t() if transposed else stored.detach()  # (out, in)
    g = gain if gain is not None else torch.ones(W.shape[1], dtype=torch.float64)
    W_new, c_new = fuse_affine(W, lin.bias, g.to(W.device), None if shift is None else shift.to(W.device))
    stored.copy_(W_new.t() if transposed else W_new)
    if c_new is not None and lin.bias is None:
        lin.bias = nn.Parameter(c_new.to(device=stored.device, dtype=stored.dtype))  # a bias it did not have
    elif c_new is not None:
        lin.bias.copy_(c_new)


def _owners(model: nn.Module) -> dict[int, dict[str, nn.Module]]:
    """Storage address -> every module (under each of its names) holding a parameter or buffer there."""
    found: dict[int, dict[str, nn.Module]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and t.numel():
                found.setdefault(t.data_ptr(), {})[name] = m
    return found


def _tied_head(g: "NormGroup", modules: dict[str, nn.Module], owners: dict[int, dict[str, nn.Module]]) -> bool:
    """True to skip ``g`` (a linear tied to an embedding); InputError for any other sharing."""
    for name in (g.norm, *g.linears):
        m = modules[name]
        for key, t in (*m._parameters.items(), *m._buffers.items()):
            if t is None or not t.numel():
                continue
            sharing = {o: x for o, x in owners[t.data_ptr()].items() if o != name}
            others = sorted(sharing)
            if not others:
                continue
            if name != g.norm and key == "weight" and all(isinstance(x, nn.Embedding) for x in sharing.values()):
                log.info("kept the gain of %r: %r shares its weight with %s (tied); fusing would change that "
                         "too", g.norm, name, ", ".join(others))
                return True
            raise InputError(f"module {name!r}: its {key} is shared with {', '.join(others)}; fusing {g.norm!r} "
                             f"into it would change those too: untie them first, or leave fuse_norms out of the "
                             f"plan's transforms")
    return False

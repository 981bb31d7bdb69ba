"""Mixture-of-experts layers whose experts are stored fused (one 3-D parameter for all experts) made into one
``nn.Linear`` pair per expert, so that every algorithm, kernel and the save format take them like any linear.

transformers 5 stores a sparse MoE layer's experts as 3-D parameters (``gate_up_proj`` ``(E, 2I, H)`` and
``down_proj`` ``(E, H, I)``, or transposed), in a module decorated with ``use_experts_implementation``. The
decoration is a contract: the module's computation is fully described by its flags (``has_gate``,
``has_bias``, ``is_transposed``, ``is_concatenated``), its ``_apply_gate`` (the gated activation, with any
clamp it applies) and its ``act_fn``, because transformers' own grouped and batched backends compute it from
those alone. :func:`unfuse_experts` reads that description and builds a :class:`LinearExperts` with the same
outputs (checked on random routed tokens before the swap; a module that does not match stays as it is, with
a warning). Its linears are named ``<experts>.<e>.gate_up_proj`` and ``<experts>.<e>.down_proj``
(``up_proj`` for experts without a gate); the router stays float.

An expert receives only the tokens routed to it, so during calibration some experts see few tokens or none:
``lowbit.quantizer`` quantizes an expert that saw none with round to nearest (said in the log and recorded in
the artifact's ``extra.calibration.fallbacks``).

``lowbit.load`` rebuilds the per-expert structure from the saved tensor names alone
(:func:`rebuild_experts`), so artifacts load whether or not the plan is passed.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn

log = logging.getLogger(__name__)

_FLAGS = ("has_gate", "has_bias", "is_transposed", "is_concatenated")


def is_fused_experts(module: nn.Module) -> bool:
    """Whether ``module`` is a transformers experts module with fused 3-D expert weights."""
    if not all(hasattr(module, f) for f in _FLAGS) or not hasattr(module, "num_experts"):
        return False
    first = "gate_up_proj" if module.has_gate else "up_proj"
    w1, w2 = getattr(module, first, None), getattr(module, "down_proj", None)
    return (isinstance(w1, nn.Parameter) and isinstance(w2, nn.Parameter) and w1.dim() == 3 and w2.dim() == 3
            and w1.shape[0] == w2.shape[0] == module.num_experts)


def _first_name(fused: nn.Module) -> str:
    return "gate_up_proj" if fused.has_gate else "up_proj"


class ExpertMLP(nn.Module):
    """One expert: ``gate_up_proj`` (or ``up_proj``) and ``down_proj``, plain linears."""

    def __init__(self, first: str, hidden: int, inner: int, out_inner: int, bias: bool) -> None:
        super().__init__()
        self.first = first
        self.add_module(first, nn.Linear(hidden, out_inner, bias=bias))
        self.down_proj = nn.Linear(inner, hidden, bias=bias)

    def up(self, x: torch.Tensor) -> torch.Tensor:
        return self._modules[self.first](x)


class LinearExperts(nn.Module):
    """A fused experts module's computation with one :class:`ExpertMLP` per expert (children ``"0"`` ..
    ``"E-1"``). Called as transformers calls its experts: ``(hidden_states (T, H), top_k_index (T, k),
    top_k_weights (T, k)) -> (T, H)``, running each expert on the tokens routed to it."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        first = _first_name(fused)
        w1, w2 = getattr(fused, first), fused.down_proj
        E = int(fused.num_experts)
        if fused.is_transposed:  # (E, H, out) and (E, I, H)
            hidden, out_inner = w1.shape[1], w1.shape[2]
            inner = w2.shape[1]
        else:  # (E, out, H) and (E, H, I)
            out_inner, hidden = w1.shape[1], w1.shape[2]
            inner = w2.shape[2]
        self.num_experts = E
        self.has_gate = bool(fused.has_gate)
        self.fused_class = type(fused).__name__
        # what the fused module's _apply_gate / act_fn read: its plain attributes (limit, alpha, ...) and act_fn
        for k, v in vars(fused).items():
            if not k.startswith("_") and k not in ("training", "config") and isinstance(v, (int, float, bool, str)):
                setattr(self, k, v)
        self.act_fn = getattr(fused, "act_fn", None)
        self._gate = type(fused)._apply_gate if self.has_gate else None
        for e in range(E):
            self.add_module(str(e), ExpertMLP(first, hidden, inner, out_inner, bool(fused.has_bias)))

    def expert(self, e: int) -> ExpertMLP:
        return self._modules[str(e)]

    def copy_from(self, fused: nn.Module) -> None:
        """Take the fused module's weights (a view of each expert's slice where the layout allows)."""
        first = _first_name(fused)
        w1, w2 = getattr(fused, first).detach(), fused.down_proj.detach()
        b1 = getattr(fused, f"{first}_bias", None) if fused.has_bias else None
        b2 = getattr(fused, "down_proj_bias", None) if fused.has_bias else None
        for e in range(self.num_experts):
            ex = self.expert(e)
            a, b = (w1[e].t().contiguous(), w2[e].t().contiguous()) if fused.is_transposed else (w1[e], w2[e])
            ex._modules[first].weight = nn.Parameter(a, requires_grad=False)
            ex.down_proj.weight = nn.Parameter(b, requires_grad=False)
            if b1 is not None:
                ex._modules[first].bias = nn.Parameter(b1.detach()[e], requires_grad=False)
                ex.down_proj.bias = nn.Parameter(b2.detach()[e], requires_grad=False)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        flat = top_k_index.reshape(-1)
        token_of = torch.arange(top_k_index.shape[0], device=top_k_index.device).repeat_interleave(
            top_k_index.shape[1])
        weights = top_k_weights.reshape(-1)
        for e in torch.unique(flat).tolist():
            if not 0 <= e < self.num_experts:
                continue  # an expert-parallel sentinel: routed elsewhere
            sel = (flat == e).nonzero().squeeze(1)
            tokens = token_of[sel]
            ex = self.expert(e)
            h = ex.up(hidden_states[tokens])
            h = self._gate(self, h) if self._gate is not None else self.act_fn(h)
            h = ex.down_proj(h) * weights[sel, None].to(h.dtype)
            out.index_add_(0, tokens, h.to(out.dtype))
        return out

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, from={self.fused_class}"


def _matches(fused: nn.Module, unfused: LinearExperts, seed: int = 0) -> str | None:
    """None when ``unfused`` computes what ``fused`` does on random routed tokens, else why not."""
    first = getattr(fused, _first_name(fused))
    hidden = first.shape[1] if fused.is_transposed else first.shape[2]
    if first.is_meta:
        return None  # nothing to compare on a skeleton
    g = torch.Generator().manual_seed(seed)
    E, T = int(fused.num_experts), 16
    k = min(2, E)
    x = torch.randn(T, hidden, generator=g).to(first.dtype)
    idx = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)])
    w = torch.softmax(torch.randn(T, k, generator=g), -1).to(first.dtype)
    try:
        with torch.no_grad():
            want = fused(x, idx, w)
            got = unfused(x, idx, w)
    except Exception as e:  # noqa: BLE001 - any failure means the layouts do not match
        return f"calling it as (hidden_states, top_k_index, top_k_weights) failed ({type(e).__name__}: {e})"
    if not isinstance(want, torch.Tensor) or want.shape != got.shape:
        return f"its output is {type(want).__name__} {getattr(want, 'shape', '')}, not (tokens, hidden)"
    err = (want.float() - got.float()).abs().max().item()
    scale = want.float().abs().max().item()
    if not err <= 1e-4 * max(scale, 1e-6) + 1e-6:
        return f"per-expert linears differ from it by {err:.3g} (output scale {scale:.3g})"
    return None


def unfuse_experts(model: nn.Module, originals: Any = None) -> list[str]:
    """Replace every fused experts module of ``model`` by an equivalent :class:`LinearExperts` (in place);
    ``originals`` (``lowbit.transforms.Originals``) keeps the replaced modules for undo. Returns the names
    replaced. A module whose computation the per-expert form does not reproduce is left fused (its experts
    then stay float) with one warning per class."""
    done, refused = [], {}
    checked: dict[type, str | None] = {}
    for name, m in list(model.named_modules()):
        if not name or not is_fused_experts(m):
            continue
        new = LinearExperts(m)
        new.copy_from(m)
        if type(m) not in checked:
            checked[type(m)] = _matches(m, new)
        why = checked[type(m)]
        if why is not None:
            refused.setdefault((type(m).__name__, why), []).append(name)
            continue
        parent, _, attr = name.rpartition(".")
        owner = model.get_submodule(parent)
        if originals is not None:
            originals.keep_object(owner, attr)
        new.train(m.training)
        setattr(owner, attr, new)
        done.append(name)
    for (cls, why), names in refused.items():
        log.warning("%d %s module(s) keep their fused expert weights in float (%s): %s", len(names), cls, why,
                    ", ".join(names[:3]) + (" ..." if len(names) > 3 else ""))
    if done:
        n = sum(model.get_submodule(d).num_experts for d in done)
        log.info("experts: %d fused experts module(s) made into %d per-expert linear pairs (%s, ...)", len(done), n,
                 done[0])
    return done


def rebuild_experts(model: nn.Module, keys: set[str]) -> list[str]:
    """Give a freshly built architecture (real or ``meta``) the per-expert structure of a saved model whose
    tensor names ``keys`` hold ``<experts>.0.*`` for a fused experts module (``lowbit.load`` calls this before
    reading the weights). Returns the names replaced."""
    done = []
    for name, m in list(model.named_modules()):
        if is_fused_experts(m) and any(k.startswith(f"{name}.0.") for k in keys):
            parent, _, attr = name.rpartition(".")
            with torch.device(getattr(m, _first_name(m)).device):  # meta stays meta: nothing allocated
                new = LinearExperts(m)
            new.to(getattr(m, _first_name(m)).dtype)
            setattr(model.get_submodule(parent), attr, new)
            done.append(name)
    return done


def experts_of(model: nn.Module) -> dict[str, LinearExperts]:
    """The :class:`LinearExperts` modules of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, LinearExperts)}


__all__ = ["ExpertMLP", "LinearExperts", "experts_of", "is_fused_experts", "rebuild_experts", "unfuse_experts"]

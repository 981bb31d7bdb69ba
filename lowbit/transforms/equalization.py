"""CNN graph preparation as equivalence transforms: BatchNorm folding and cross-layer equalization.

Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV 2019 (DFQ).

``fold_batchnorm``: every eval-mode BatchNorm whose only input is a convolution or linear ``A`` (and which is
``A``'s only user) is folded into ``A``: ``c = gamma / sqrt(var + eps)``, ``W <- c W`` (per output channel),
``b <- c (b - mean) + beta``; the BatchNorm becomes ``nn.Identity``. Exact in real arithmetic.

``equalize`` (CLE, DFQ Sec. 4.1): for consecutive layers ``A -> f -> B`` where ``f`` is positively homogeneous
(identity or ReLU: ``f(x / s) = f(x) / s`` for ``s > 0``), output channel ``i`` of ``A`` is divided by ``s_i``
and input channel ``i`` of ``B`` multiplied by it. With ``r1_i`` the range (max |w|) of ``A``'s row ``i`` and
``r2_i`` that of ``B``'s column ``i``, ``s_i = sqrt(r1_i / r2_i)`` makes both ``sqrt(r1_i r2_i)``, which
maximizes the per-channel precision of the pair (DFQ eq. 8-11). Sweeps over all pairs repeat until the
scales stop changing (chains ``A -> B -> C`` couple). It folds BatchNorms first.

A clipped activation (ReLU6, ``Hardtanh(0, t)``) is not homogeneous: ``min(x / s, t) != min(x, t) / s``, and
replacing ReLU6 by ReLU (DFQ's choice for MobileNetV2) changes EfficientNet-Lite0's float top-1 on 69% of the
photo views. Such a pair is equalized exactly: its activation module becomes :class:`ClampChannels`, a ReLU
with the clip ``t / s_i`` per channel. That needs the module to be called at that one place; a module the
model calls at several places (EfficientNet-Lite's blocks call one ReLU6 twice) cannot differ between them, so
those pairs are left unscaled (logged). Scaling by calibration maxima (treating a channel that stayed below
the clip as ReLU) was tried and rejected: images beyond the calibration set cross the clip.

Which layers form pairs comes from the module tree and a ``torch.fx`` trace with convolutions, linears,
BatchNorms and activations as leaves: no list of architectures. A model that cannot be traced is refused
with the tracer's reason. Convolutions with groups are handled (depthwise as ``A`` or ``B``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from lowbit.algorithms.bias_correction import expected_clamped_normal
from lowbit.errors import InputError

if TYPE_CHECKING:
    from lowbit.transforms import Originals

log = logging.getLogger(__name__)

LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_LEAVES = (*LAYERS, *_BN, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Identity, nn.Flatten, nn.AdaptiveAvgPool2d,
           nn.AvgPool2d, nn.Dropout)
_RELU_FUNCTIONS = (F.relu, torch.relu)
# a layer a BatchNorm was folded into keeps, as this attribute (not saved), the BatchNorm's output distribution
# per channel, (mean, std) = (beta, |gamma|): what analytic bias correction needs of the layer after it
OUTPUT_NORMAL = "_lowbit_output_normal"
_PASS_THROUGH = (nn.Identity, nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.Dropout)  # per-channel means kept
_PASS_FUNCTIONS = (torch.flatten, torch.reshape, F.adaptive_avg_pool2d, F.avg_pool2d, F.dropout)
# (a reshape that spreads spatial positions over the channels is caught by the channel count check)
MAX_SWEEPS = 50
TOLERANCE = 1e-6  # a sweep whose largest |log s| is below this ends the iteration


@dataclass(frozen=True)
class Pair:
    """``A -> activation -> B``: module names, the activation's clip ``t`` (None: identity or ReLU) and, for a
    clipped activation called at this place only, its module name (None otherwise); ``relu``: a ReLU between."""

    a: str
    b: str
    clip: float | None
    act: str | None = None
    relu: bool = False  # a ReLU between (clip None): not the identity


def fold_batchnorm(model: nn.Module, originals: "Originals | None" = None, *, data: Any = None,
                   plan: Any = None, progress: bool = False) -> nn.Module:
    """Fold every BatchNorm that follows a convolution or linear into it (see the module docstring); in place."""
    _fold(model, originals)
    return model


def equalize(model: nn.Module, originals: "Originals | None" = None, *, data: Any = None, plan: Any = None,
             progress: bool = False) -> nn.Module:
    """Fold BatchNorms, then equalize every ``A -> act -> B`` pair's per-channel ranges; in place (see the
    module docstring). Data-free: ``data``, ``plan`` and ``progress`` are accepted and unused."""
    _fold(model, originals)
    modules = dict(model.named_modules())
    pairs = layer_pairs(model)
    shared = [p for p in pairs if p.clip is not None and p.act is None]
    pairs = [p for p in pairs if p not in shared]
    if shared:
        log.info("equalize: %d pair(s) behind a clipped activation that the model calls at several places (%s -> "
                 "%s, ...) are left unscaled: the clip cannot be moved per channel there", len(shared), shared[0].a,
                 shared[0].b)
    if not pairs:
        log.warning("equalize: no pair of consecutive convolutions/linears to equalize found")
        return model
    clips: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for p in pairs:
            if originals is not None:
                for name in (p.a, p.b):
                    originals.keep(modules[name], "weight")
                    originals.keep(modules[name], "bias")
            if p.clip is not None:
                m = modules[p.act]
                clips[p.act] = m.clip_max.clone() if isinstance(m, ClampChannels) else \
                    torch.full((_channels_out(modules[p.a]),), p.clip)
        for sweep in range(MAX_SWEEPS):
            worst = 0.0
            for p in pairs:
                b = modules[p.b]
                s = equalization_scales(modules[p.a].weight, b.weight, getattr(b, "groups", 1))
                _apply_scales(modules[p.a], b, s)
                if p.clip is not None:
                    clips[p.act] = clips[p.act] / s
                worst = max(worst, float(s.log().abs().max()))
            if worst < TOLERANCE:
                break
        for act, t in clips.items():
            if originals is not None:
                parent, _, attr = act.rpartition(".")
                originals.keep_object(model.get_submodule(parent) if parent else model, attr)
            model.set_submodule(act, ClampChannels(t, _spatial(modules[_producer(pairs, act)])))
    log.info("equalized %d layer pair(s) in %d sweep(s)%s", len(pairs), sweep + 1,
             f", {len(clips)} behind a clipped activation (now clipped per channel)" if clips else "")
    return model


class ClampChannels(nn.Module):
    """``clamp(x, 0, clip_max[c])`` per channel ``c``: a ReLU6 after equalization. ``spatial``: the number of
    dimensions after the channel one (2 for a ``Conv2d``'s ``(N, C, H, W)`` output, 0 for a linear's, whose
    channels are the last dimension)."""

    def __init__(self, clip_max: torch.Tensor, spatial: int = 2) -> None:
        super().__init__()
        self.register_buffer("clip_max", clip_max.detach().float().clone())
        self.spatial = int(spatial)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.clip_max.to(x.dtype).reshape(-1, *([1] * self.spatial))  # (C, 1, ..., 1)
        return torch.minimum(x.clamp(min=0), t)

    def extra_repr(self) -> str:
        return f"{self.clip_max.numel()} channels, spatial={self.spatial}"


def _spatial(layer: nn.Module) -> int:
    """Dimensions after the channel dimension of ``layer``'s output (a linear's channels are the last one)."""
    return 0 if isinstance(layer, nn.Linear) else layer.weight.dim() - 2


def _producer(pairs: list["Pair"], act: str) -> str:
    return next(p.a for p in pairs if p.act == act)


def equalization_scales(W1: torch.Tensor, W2: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """DFQ's ``s_i = sqrt(r1_i / r2_i)`` for ``A`` (weight ``W1``, output channel = dim 0) feeding ``B``
    (weight ``W2``: ``(out, in // groups, *kernel)`` or ``(out, in)``). Channels with a zero range keep 1.

    Returns: float32 ``(channels,)``; divide ``A``'s rows by it, multiply ``B``'s input channels by it.
    """
    r1 = W1.detach().float().reshape(W1.shape[0], -1).abs().amax(1)  # (channels,)
    r2 = _input_channel_range(W2.detach().float(), groups)
    s = torch.sqrt(r1 / r2)
    return torch.where((r1 > 0) & (r2 > 0) & torch.isfinite(s), s, torch.ones_like(s))


def layer_pairs(model: nn.Module) -> list[Pair]:
    """Every ``A -> [ReLU | ReLU6 | Hardtanh(0, t) | ClampChannels | nothing] -> B`` in ``model``'s traced graph
    where each step is the only user of the one before and ``B`` takes ``A``'s channels as its input channels (a
    ClampChannels' ``clip`` is its largest)."""
    graph = _trace(model)
    modules = dict(model.named_modules())

    def module(n: fx.Node) -> nn.Module | None:
        return modules.get(n.target) if n.op == "call_module" else None

    pairs = []
    for n in graph.nodes:
        a = module(n)
        if not isinstance(a, LAYERS):
            continue
        cur, clip, act, relu = n, None, None, False
        nxt = _only_user(cur)
        while nxt is not None and isinstance(module(nxt), nn.Identity):  # a folded BatchNorm
            cur, nxt = nxt, _only_user(nxt)
        if nxt is not None and _is_relu(nxt, modules):
            cur, nxt, relu = nxt, _only_user(nxt), True
        elif nxt is not None and (t := _clip_of(module(nxt))) is not None:
            calls = sum(1 for m in graph.nodes if m.op == "call_module" and m.target == nxt.target)
            cur, clip, act, nxt = nxt, t, nxt.target if calls == 1 else None, _only_user(nxt)
        elif nxt is not None and isinstance(module(nxt), ClampChannels):  # clipped per channel already (equalize)
            cur, clip, act, nxt = nxt, float(module(nxt).clip_max.max()), nxt.target, _only_user(nxt)
        b = module(nxt) if nxt is not None else None
        if isinstance(b, LAYERS) and nxt.args[0] is cur and _channels_out(a) == _channels_in(b) \
                and (type(b) is not nn.Linear or type(a) is nn.Linear):
            pairs.append(Pair(n.target, nxt.target, clip, act, relu))
    return pairs


def rebuild_fold_batchnorm(model: nn.Module, keys: set[str]) -> None:
    """Give a freshly built architecture the structure folding and equalization left (for ``lowbit.load``):
    BatchNorms whose statistics the saved ``keys`` lack become ``nn.Identity``; layers given a bias by folding
    get one; activations with a per-channel clip in ``keys`` become :class:`ClampChannels`."""
    for name, m in list(model.named_modules()):
        if isinstance(m, _BN) and f"{name}.running_mean" not in keys and name:
            model.set_submodule(name, nn.Identity())
        elif isinstance(m, LAYERS) and m.bias is None and f"{name}.bias" in keys:
            w = m.weight
            m.bias = nn.Parameter(torch.zeros(w.shape[0], dtype=w.dtype, device=w.device), requires_grad=False)
    producers = {p.act: p.a for p in layer_pairs(model) if p.act is not None} if any(
        k.endswith(".clip_max") for k in keys) else {}
    modules = dict(model.named_modules())
    for act, a in producers.items():
        if f"{act}.clip_max" in keys:
            zeros = torch.zeros(_channels_out(modules[a]), device=modules[a].weight.device)
            model.set_submodule(act, ClampChannels(zeros, _spatial(modules[a])))


def _fold(model: nn.Module, originals: "Originals | None") -> int:
    """Fold BatchNorms into the layer before them; return how many."""
    graph = _trace(model)
    modules = dict(model.named_modules())
    folded = 0
    with torch.no_grad():
        for n in graph.nodes:
            bn = modules.get(n.target) if n.op == "call_module" else None
            if not isinstance(bn, _BN) or not n.args or not isinstance(n.args[0], fx.Node):
                continue
            src = n.args[0]
            layer = modules.get(src.target) if src.op == "call_module" else None
            if not isinstance(layer, LAYERS) or len(src.users) != 1 or bn.training or bn.running_var is None:
                continue
            _fold_one(model, src.target, layer, n.target, bn, originals)
            folded += 1
    if folded:
        log.info("folded %d BatchNorm(s) into the layer before each", folded)
    return folded


def _fold_one(model: nn.Module, lname: str, layer: nn.Module, bname: str, bn: nn.Module,
              originals: "Originals | None") -> None:
    if originals is not None:
        originals.keep(layer, "weight")
        originals.keep(layer, "bias")
        parent, _, attr = bname.rpartition(".")
        originals.keep_object(model.get_submodule(parent) if parent else model, attr)
    c = (bn.weight.double() if bn.affine else 1.0) / torch.sqrt(bn.running_var.double() + bn.eps)  # (out,)
    w = layer.weight
    b = layer.bias.double() if layer.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    new_b = c * (b - bn.running_mean.double()) + (bn.bias.double() if bn.affine else 0.0)
    w.data = (w.double() * c.reshape(-1, *([1] * (w.dim() - 1)))).to(w.dtype)
    if layer.bias is None:
        layer.bias = nn.Parameter(new_b.to(w.dtype), requires_grad=w.requires_grad)
    else:
        layer.bias.data = new_b.to(layer.bias.dtype)
    layer.__dict__[OUTPUT_NORMAL] = _bn_output_normal(bn)  # for analytic bias correction of the next layer
    model.set_submodule(bname, nn.Identity())


def _apply_scales(a: nn.Module, b: nn.Module, s: torch.Tensor) -> None:
    """``A``'s output channels divided by ``s``, ``B``'s input channels multiplied by it."""
    if OUTPUT_NORMAL in a.__dict__:
        a.__dict__[OUTPUT_NORMAL] = tuple(v / s for v in a.__dict__[OUTPUT_NORMAL])
    a.weight.data = a.weight.data / s.reshape(-1, *([1] * (a.weight.dim() - 1))).to(a.weight.dtype)
    if a.bias is not None:
        a.bias.data = a.bias.data / s.to(a.bias.dtype)
    groups = getattr(b, "groups", 1)
    w = b.weight.data
    in_g = w.shape[1]
    per_col = s.reshape(groups, in_g)  # (groups, in // groups): the scale of each group's input column
    f = per_col.repeat_interleave(w.shape[0] // groups, dim=0)  # (out, in // groups)
    b.weight.data = w * f.reshape(*f.shape, *([1] * (w.dim() - 2))).to(w.dtype)


def _input_channel_range(W: torch.Tensor, groups: int) -> torch.Tensor:
    """max |w| over each input channel of a weight ``(out, in // groups, *kernel)`` -> ``(in,)``."""
    out, in_g = W.shape[0], W.shape[1]
    per = W.abs().reshape(groups, out // groups, in_g, -1).amax(dim=(1, 3))  # (groups, in // groups)
    return per.reshape(-1)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (*_LEAVES, ClampChannels)) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.Graph:
    try:
        return _Tracer().trace(model)
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else ""
        raise InputError(f"torch.fx cannot trace {type(model).__name__} ({type(e).__name__}: {first}), so the "
                         f"layer pairs that BatchNorm folding and equalization need cannot be found") from e


def _only_user(n: fx.Node) -> fx.Node | None:
    users = list(n.users)
    return users[0] if len(users) == 1 and users[0].args and users[0].args[0] is n else None


def _is_relu(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.op == "call_module":
        return type(modules.get(n.target)) is nn.ReLU
    return n.op == "call_function" and n.target in _RELU_FUNCTIONS and len(n.args) == 1 and not n.kwargs


def _clip_of(m: nn.Module | None) -> float | None:
    """``t`` of a ReLU6 / ``Hardtanh(0, t)`` module, else None."""
    if isinstance(m, nn.ReLU6):
        return 6.0
    if type(m) is nn.Hardtanh and m.min_val == 0.0 and m.max_val > 0:
        return float(m.max_val)
    return None


def _channels_out(m: nn.Module) -> int:
    return m.out_features if isinstance(m, nn.Linear) else m.out_channels


def _channels_in(m: nn.Module) -> int:
    return m.in_features if isinstance(m, nn.Linear) else m.in_channels


def expected_input_means(model: nn.Module, names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """DFQ's analytic input mean per input channel of each layer in ``names``, from the BatchNorm before it.

    The layer's input must be ``[ReLU | ReLU6 | Hardtanh(0, t) | per-channel clip](BatchNorm(...))``, with
    pooling, flatten, dropout or a folded BatchNorm's identity allowed between, where the BatchNorm is a module
    still there or one folded into the layer before (``fold_batchnorm``/``equalize`` keep its statistics). The
    BatchNorm's output per channel is taken as ``N(beta, gamma^2)``. Zero padding is ignored.

    Returns: ``({name: float32 (in_channels,)}, {name: why not})``: a layer whose input is not such (the first
    convolution, which sees the images) is in the second dict, with the reason.
    """
    graph = _trace(model)
    modules = dict(model.named_modules())
    wanted = set(names)
    means: dict[str, torch.Tensor] = {}
    why: dict[str, str] = {}
    for n in graph.nodes:
        if n.op != "call_module" or n.target not in wanted:
            continue
        if n.target in means or n.target in why:
            means.pop(n.target, None)
            why[n.target] = "called at several places, each with its own input"
            continue
        found = _analytic_mean(n, modules)
        if isinstance(found, str):
            why[n.target] = found
        else:
            means[n.target] = found
    for name in sorted(wanted - means.keys() - why.keys()):
        why[name] = "not called by the traced forward"
    return means, why


def _analytic_mean(node: fx.Node, modules: dict[str, nn.Module]) -> torch.Tensor | str:
    """The layer's expected input per channel, or why it cannot be derived."""
    layer = modules[node.target]
    cur = node.args[0] if node.args else None
    acts: list[Any] = []  # activations met walking back from the layer's input: (clip or None)
    while isinstance(cur, fx.Node):
        m = modules.get(cur.target) if cur.op == "call_module" else None
        if _is_relu(cur, modules):
            acts.append(None)
        elif (t := _clip_of(m)) is not None:
            acts.append(t)
        elif isinstance(m, ClampChannels):
            acts.append(m.clip_max)
        elif not (isinstance(m, _PASS_THROUGH) or cur.op == "call_function" and cur.target in _PASS_FUNCTIONS
                  or cur.op == "call_method" and cur.target in ("flatten", "view", "reshape")):
            break
        cur = cur.args[0] if cur.args else None
    src = modules.get(cur.target) if isinstance(cur, fx.Node) and cur.op == "call_module" else None
    if isinstance(src, _BN) and not src.training and src.running_var is not None:
        mu, sigma = _bn_output_normal(src)
    elif src is not None and OUTPUT_NORMAL in src.__dict__:
        mu, sigma = src.__dict__[OUTPUT_NORMAL]
    else:
        return f"no BatchNorm before its input (through ReLU/ReLU6, pooling or flatten), which comes from " \
               f"{getattr(cur, 'target', cur)!r}"
    if len(acts) > 1:
        return f"{len(acts)} activations between the BatchNorm and it (one is modelled)"
    mean = expected_clamped_normal(mu, sigma, acts[0] if acts else None, rectified=bool(acts))
    if mean.numel() != _channels_in(layer):
        return f"{_channels_in(layer)} input channels after a BatchNorm of {mean.numel()}"
    return mean


def _bn_output_normal(bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, std) per channel of an eval-mode BatchNorm's output for inputs with its running statistics."""
    var = bn.running_var.detach().double()
    std = torch.sqrt(var / (var + bn.eps))
    if bn.affine:
        return bn.bias.detach().double().float(), (bn.weight.detach().double().abs() * std).float()
    return torch.zeros_like(var).float(), std.float()

"""High-bias absorption (Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction",
ICCV 2019, Sec. 4.2): the part of a layer's output that its activation always passes moves into the next layer's
bias, so the activation's range shrinks without changing the model.

For ``A -> [BatchNorm] -> ReLU -> B``, with ``A``'s (BatchNorm-folded) output channel ``i`` distributed as the
BatchNorm's ``N(beta_i, gamma_i^2)``, ``c_i = max(0, beta_i - 3 |gamma_i|)`` is a value the pre-activation stays
above for all but 0.135% of inputs (DFQ's choice). Where ``y_i >= c_i``, ``relu(y_i) = relu(y_i - c_i) + c_i``, so

    b_A <- b_A - c,     b_B <- b_B + B(c)

(``B(c)``: ``B``'s weights applied to the constant ``c``, ``W_B c`` for a linear, the kernel sums for a
convolution) gives the same output with ``A``'s output ``c`` lower. A clipped activation ``clamp(y, 0, t)``
becomes ``clamp(y - c, 0, t - c)``: its module turns into a :class:`~lowbit.transforms.equalization.ClampChannels`
with the clip ``t - c`` per channel (so it must be called at that one place only; with ``c <= t``).

Exact, in real arithmetic, for every input whose pre-activations stay at or above ``c``; an input below ``c`` in
some channel changes the output there (the Gaussian assumption says how rarely). ``B`` must not pad its input:
a padded border would hold ``-c`` after the shift where it held 0, so a padded ``B`` (a 3x3 convolution, a
depthwise one) keeps its pair unchanged, as does a pair whose ``A`` has no BatchNorm statistics (the first layer
of a model without BatchNorm), or whose clipped activation the model calls at several places. The transform
says how many pairs it changed and why the others were left.

Which layers form pairs comes from the same ``torch.fx`` trace as equalization
(:func:`~lowbit.transforms.equalization.layer_pairs`); BatchNorms are folded first.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit.algorithms.bias_correction import bias_correction
from lowbit.transforms.equalization import OUTPUT_NORMAL, ClampChannels, _fold, _spatial, layer_pairs

if TYPE_CHECKING:
    from lowbit.transforms import Originals

log = logging.getLogger(__name__)

SIGMAS = 3.0  # c = beta - 3 |gamma|: the pre-activation stays above it with probability 99.865% (DFQ)


def absorb_bias(model: nn.Module, originals: "Originals | None" = None, *, data: Any = None, plan: Any = None,
                progress: bool = False) -> nn.Module:
    """Fold BatchNorms, then absorb each ``A -> ReLU/clip -> B`` pair's always-passed output into ``B``'s bias
    (see the module docstring); in place. Data-free."""
    _fold(model, originals)
    modules = dict(model.named_modules())
    done, why = 0, {}
    with torch.no_grad():
        for p in layer_pairs(model):
            a, b = modules[p.a], modules[p.b]
            reason = _why_not(p, a, b)
            if reason is not None:
                why.setdefault(reason, []).append(f"{p.a} -> {p.b}")
                continue
            mu, sigma = a.__dict__[OUTPUT_NORMAL]
            c = (mu.float() - SIGMAS * sigma.float()).clamp(min=0)  # (channels,)
            act = modules[p.act] if p.act is not None else None
            if act is not None:
                clip = act.clip_max if isinstance(act, ClampChannels) else torch.full_like(c, p.clip)
                c = torch.minimum(c, clip)
            if not bool((c > 0).any()):
                why.setdefault("no channel's BatchNorm output stays above 0", []).append(f"{p.a} -> {p.b}")
                continue
            if originals is not None:
                originals.keep(a, "bias")
                originals.keep(b, "bias")
            a.bias.data -= c.to(a.bias.dtype)
            a.__dict__[OUTPUT_NORMAL] = (mu - c, sigma)
            _add_bias(b, bias_correction(b.weight.detach(), c, getattr(b, "groups", 1)))  # B applied to c
            if act is not None:
                if originals is not None:
                    parent, _, attr = p.act.rpartition(".")
                    originals.keep_object(model.get_submodule(parent) if parent else model, attr)
                model.set_submodule(p.act, ClampChannels(clip - c, _spatial(a)))
            done += 1
    for reason, pairs in why.items():
        log.info("absorb_bias: %d pair(s) left (%s: %s%s)", len(pairs), reason, pairs[0],
                 ", ..." if len(pairs) > 1 else "")
    (log.info if done else log.warning)("absorb_bias: moved the always-passed part of %d layer pair(s) into the next "
                                        "layer's bias", done)
    return model


def _why_not(p: Any, a: nn.Module, b: nn.Module) -> str | None:
    """Why the pair ``p`` (layers ``a -> b``) cannot absorb, or None."""
    if p.clip is None and not p.relu:
        return "no ReLU between"
    if p.clip is not None and p.act is None:
        return "a clipped activation the model calls at several places"
    if OUTPUT_NORMAL not in a.__dict__ or a.bias is None:
        return "no BatchNorm statistics for the first layer's output"
    padding = getattr(b, "padding", ())  # a linear has none; a convolution's is a tuple or "same" / "valid"
    if padding != "valid" if isinstance(padding, str) else any(padding):
        return "the second layer pads its input"
    return None


def _add_bias(b: nn.Module, delta: torch.Tensor) -> None:
    if b.bias is None:
        b.bias = nn.Parameter(delta.to(b.weight.dtype), requires_grad=b.weight.requires_grad)
    else:
        b.bias.data += delta.to(b.bias.dtype)


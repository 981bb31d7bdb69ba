"""Quantized inputs of modules without weights: a softmax's scores, a GELU's or LayerNorm's input.

A plan's ``inputs`` (:class:`InputQuant`: a module-name pattern and an :class:`~lowbit.spec.ActivationQuant`)
names modules whose *input* an integer runtime would see as codes although the module has no weight to
quantize: the attention softmax (its input is the ``q k^T`` product), the MLP's GELU, a LayerNorm. After the
plan's layers are quantized, :func:`quantize_inputs` calibrates a static range for each (in one pass of the
quantized model, before any of these inputs is quantized, with the observer the setting names) and
:func:`attach_input_quant` puts a forward pre-hook on the module that fake-quantizes its first argument: the
module then computes on the values the codes stand for, so evaluation measures what quantizing that point
costs. The hooks change no module and no state dict; the ranges live in a record on the model that
``lowbit.save`` writes into the manifest (``extra["inputs"]``) and ``lowbit.load`` attaches again.

Only modules called as modules can be hooked: a softmax written as ``torch.softmax(...)`` inside an attention's
``forward`` (Hugging Face's eager attention) has no module to name; bundled models call ``nn.Softmax``.
Quantized layers have their own ``act``; a pattern that names one is refused.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from lowbit.errors import CorruptFileError, InputError
from lowbit.formats import fake_quantize, fake_quantize_dynamic
from lowbit.spec import ActivationQuant

log = logging.getLogger(__name__)

INPUTS_ATTR = "_lowbit_inputs"  # on the model: {module name: record}; what save() writes as extra["inputs"]
_HANDLES_ATTR = "_lowbit_input_handles"


@dataclass(frozen=True)
class InputQuant:
    """Quantize the input of every module whose dotted name matches ``pattern`` (a glob, ``re:`` regex or
    ``type:ClassName``, as plan patterns) with ``act``."""

    pattern: str
    act: ActivationQuant

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise InputError(f"an inputs entry needs a non-empty module-name pattern, got {self.pattern!r}")
        if isinstance(self.act, (str, dict)):
            object.__setattr__(self, "act", ActivationQuant.from_dict(self.act))
        if not isinstance(self.act, ActivationQuant):
            raise InputError(f"inputs {self.pattern!r}: act must be an activation quantization, got {self.act!r}")

    def to_dict(self) -> dict[str, Any]:
        return {"pattern": self.pattern, "act": self.act.to_dict()}

    @classmethod
    def from_dict(cls, d: Any, where: str = "inputs entry") -> "InputQuant":
        if not isinstance(d, dict) or set(d) != {"pattern", "act"}:
            raise InputError(f"{where}: expected a mapping with exactly 'pattern' and 'act', got {d!r}")
        try:
            return cls(d["pattern"], d["act"])
        except InputError as e:
            raise InputError(f"{where}: {e}") from None


def select_inputs(model: nn.Module, inputs: tuple[InputQuant, ...]) -> dict[str, ActivationQuant]:
    """``{module name: act}``: for each module the first entry whose pattern matches it. Every entry must match
    a module; none may be a layer the plan quantizes (``lowbit.nn.convert.is_quantizable``).

    Raises:
        InputError: an entry matches no module, or matches a quantizable layer.
    """
    from lowbit.nn.convert import is_quantizable
    from lowbit.plan import _match  # lazy: lowbit.plan imports this module

    chosen: dict[str, ActivationQuant] = {}
    for e in inputs:
        hits = [(n, m) for n, m in model.named_modules() if n and _match(e.pattern, n, m)]
        if not hits:
            raise InputError(f"inputs pattern {e.pattern!r} matches no module of {type(model).__name__} (module names "
                             f"look like {_examples(model)})")
        layers = [n for n, m in hits if is_quantizable(m)]
        if layers:
            raise InputError(f"inputs pattern {e.pattern!r} matches {layers[0]}, a layer with weights: quantize its "
                             f"input with a rule's act instead")
        for n, _ in hits:
            chosen.setdefault(n, e.act)
    return chosen


def quantize_inputs(model: nn.Module, points: dict[str, ActivationQuant], data: Any, progress: bool = True) -> None:
    """Calibrate the static ranges of ``points`` on ``model`` (as it is now: quantized) and attach the hooks;
    ``data`` (calibration batches) is needed when any is static (``lowbit.quantize`` checks that first)."""
    from lowbit.calibration.capture import Request, collect_input_stats

    static = {n: Request(model.get_submodule(n), act=a) for n, a in points.items() if not a.dynamic}
    stats = collect_input_stats(model, static, data, progress) if static else {}
    record = {}
    for n, a in points.items():
        lo, hi = stats[n].act_range if n in stats else (None, None)
        record[n] = {"act": a.to_dict(), "lo": None if lo is None else float(lo),
                     "hi": None if hi is None else float(hi)}
    attach_input_quant(model, record)
    log.info("quantized the input of %d module(s) without weights (%s%s)", len(record), next(iter(record)),
             ", ..." if len(record) > 1 else "")


def attach_input_quant(model: nn.Module, record: dict[str, dict]) -> None:
    """Hook the modules named in ``record`` (``{name: {"act": dict, "lo": float | None, "hi": float | None}}``)
    to fake-quantize their first argument; replaces an earlier attachment.

    Raises:
        CorruptFileError: the record is malformed (it comes from a manifest) or names a module ``model`` lacks;
            nothing is attached then.
    """
    hooks = check_input_record(model, record)
    detach_input_quant(model)
    handles = [model.get_submodule(n).register_forward_pre_hook(h) for n, h in hooks.items()]
    model.__dict__[_HANDLES_ATTR] = handles
    model.__dict__[INPUTS_ATTR] = {n: dict(r) for n, r in record.items()}


def check_input_record(model: nn.Module, record: Any) -> dict[str, Any]:
    """The hook of each entry of ``record`` (see :func:`attach_input_quant`), checked against ``model``.

    Raises:
        CorruptFileError: as :func:`attach_input_quant`.
    """
    if not isinstance(record, dict):
        raise CorruptFileError(f"input quantization record must map module names to settings, got {record!r}")
    hooks = {}
    for name, r in record.items():
        try:
            act = ActivationQuant.from_dict(r["act"])
            lo, hi = r["lo"], r["hi"]
            model.get_submodule(name)
            if not act.dynamic and not (isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo <= hi):
                raise ValueError(f"static range [{lo}, {hi}]")
        except (InputError, KeyError, TypeError, ValueError, AttributeError) as e:
            raise CorruptFileError(f"input quantization record for {name!r} cannot be applied: {e}") from None
        hooks[name] = _hook(act, lo, hi)
    return hooks


def detach_input_quant(model: nn.Module) -> None:
    """Remove the hooks :func:`attach_input_quant` put on ``model`` (no-op if none)."""
    for h in model.__dict__.pop(_HANDLES_ATTR, []):
        h.remove()
    model.__dict__.pop(INPUTS_ATTR, None)


def _hook(act: ActivationQuant, lo: float | None, hi: float | None):
    lo_t = None if lo is None else torch.tensor([[lo]], dtype=torch.float32)  # (1, 1): one per-tensor tile
    hi_t = None if hi is None else torch.tensor([[hi]], dtype=torch.float32)

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        x = args[0]
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x  # (tokens, features)
        if act.dynamic:
            y = fake_quantize_dynamic(x2, act.spec, act.clip)
        else:
            y = fake_quantize(x2, act.spec, lo_t, hi_t)
        return (y.reshape(x.shape), *args[1:])

    return hook


def _examples(model: nn.Module) -> str:
    names = [n for n, m in model.named_modules() if n and not list(m.children())][:3]
    return ", ".join(names) or "(none)"

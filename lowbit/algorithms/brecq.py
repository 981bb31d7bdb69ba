"""Block reconstruction (BRECQ, QDrop): learn the rounding of all of a block's layers on the block's output.

Li et al., "BRECQ: Pushing the Limit of Post-Training Quantization by Block Reconstruction", ICLR 2021;
Wei et al., "QDrop: Randomly Dropping Quantization for Extremely Low-bit Post-Training Quantization", ICLR 2022.

AdaRound (``lowbit.algorithms.adaround``) rounds each layer for its own output. Layers inside a block interact
(a residual branch, attention's products), so BRECQ rounds every layer of a block jointly for the block's
output: each quantized weight gets AdaRound's soft rounding variable on its grid (the scales and zero points
the plan's algorithm chose), and ``V`` minimizes

    ||block_q(x_q) - block_float(x_float)||^2 / (the same with the codes as they were)  +  lambda * mean(reg)

over the calibration data, where ``x_q`` is the block's input in the model quantized so far (blocks are done in
the order the model runs them) and the quantized block also quantizes its layers' inputs as planned
(activation quantization in the loop, straight-through gradients). With ``drop > 0`` (QDrop), each activation
element is left unquantized with that probability during optimization, which flattens the loss landscape the
rounding is learned in. The final codes are the hardened ``h(V)``; a block whose output error ends higher than
with its codes before keeps those (logged), so reconstruction never makes a block worse on the calibration data.

Blocks (*units*) come from the module tree: the children of an ``nn.ModuleList`` or ``nn.Sequential`` whose every
child holds quantized layers (a ResNet's residual blocks, EfficientNet's MBConv blocks, a ViT's or an LLM's
layers; outermost such list only), and every quantized layer outside those as a unit of its own (the stem, the
classifier). ``quantize()`` runs this after its own pass when the plan has ``reconstruct:``, against a float
copy of the model taken after the plan's transforms (so memory holds the model twice while it runs).

A unit is called with what the model passed it (keyword arguments included: an LLM layer's rotary tables and
masks); the calibration batches are merged into one set whose rows each step samples, tensors over the batch
cut by rows and the rest (a rotary table with one row for every sample) passed whole.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lowbit.algorithms.adaround import GAMMA, ZETA, _grid, _rect_sigmoid
from lowbit.errors import InputError
from lowbit.formats import QuantizedTensor

log = logging.getLogger(__name__)

CAPTURE_ROWS = 64  # rows per forward pass while capturing a tensor of calibration inputs


@dataclass(frozen=True)
class Reconstruction:
    """Settings of block reconstruction (recipe key ``reconstruct:``).

    Attributes:
        iters: Adam steps per block.
        batch: calibration samples per step.
        lr: Adam's learning rate on the rounding variables.
        reg: ``lambda`` of AdaRound's rounding regularizer (mean over weights; the error is relative).
        beta: ``(start, end)`` of the regularizer's exponent, annealed after ``warmup`` of the steps.
        warmup: fraction of the steps without the regularizer.
        drop: QDrop's probability of leaving an activation element unquantized while learning (0: BRECQ).
    """

    iters: int = 1000
    batch: int = 32
    lr: float = 3e-2
    reg: float = 10.0
    beta: tuple[float, float] = (20.0, 2.0)
    warmup: float = 0.2
    drop: float = 0.5

    def __post_init__(self) -> None:
        for f in ("iters", "batch"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"reconstruct: {f} must be a positive integer, got {v!r}")
        for f, lo, hi in (("lr", 0.0, math.inf), ("reg", 0.0, math.inf), ("warmup", 0.0, 1.0), ("drop", 0.0, 1.0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v < hi or (f == "lr" and v == 0):
                raise InputError(f"reconstruct: {f} must be a number in [{lo}, {hi}), got {v!r}")
            object.__setattr__(self, f, float(v))
        beta = tuple(self.beta) if isinstance(self.beta, (list, tuple)) else None
        if beta is None or len(beta) != 2 or not all(isinstance(b, (int, float)) and b > 0 for b in beta):
            raise InputError(f"reconstruct: beta must be two positive numbers (start, end), got {self.beta!r}")
        object.__setattr__(self, "beta", (float(beta[0]), float(beta[1])))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["beta"] = list(self.beta)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = "reconstruct") -> "Reconstruction":
        if d is True:
            return cls()
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected true or a mapping of settings, got {d!r}")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"{where}: unknown setting(s) {unknown}; known: {', '.join(sorted(known))}")
        return cls(**d)


def reconstruct(model: nn.Module, float_model: nn.Module, data: Any, config: Reconstruction = Reconstruction(),
                progress: bool = True) -> dict[str, float]:
    """Block reconstruction of the quantized ``model`` against ``float_model`` (same module names, float
    layers where ``model`` has quantized ones) on calibration ``data``; in place. Returns, per unit, its output
    error after reconstruction relative to before (1.0 where the codes were kept)."""
    from lowbit.nn.base import QuantModule

    units = reconstruction_units(model)
    if not units:
        log.warning("reconstruct: no quantized layer found; nothing to reconstruct")
        return {}
    order = _call_order(model, units, data)
    float_modules = dict(float_model.named_modules())
    result = {}
    for name in tqdm(order, desc="reconstruct", unit="block", disable=not progress, leave=False):
        unit = model.get_submodule(name)
        layers = [(n, m) for n, m in unit.named_modules() if isinstance(m, QuantModule)]
        softs = {}
        for n, m in layers:
            full = f"{name}.{n}" if n else name
            why = _why_not(m, float_modules.get(full))
            if why is not None:
                log.info("reconstruct: %s keeps its codes (%s)", full, why)
                continue
            softs[n] = _Soft(m, float_modules[full].weight.detach().float())
        if not softs:
            continue
        inputs = _unit_inputs(model, name, data)
        f_inputs = _unit_inputs(float_model, name, data)
        with torch.no_grad():
            targets = [_first(float_modules[name](*a, **k)) for a, k in f_inputs]
        result[name] = _optimize(model, name, softs, inputs, targets, config, progress)
    return result


def reconstruction_units(model: nn.Module) -> list[str]:
    """The names of the units to reconstruct (see the module docstring), in module order."""
    from lowbit.nn.base import QuantModule

    def holds(m: nn.Module) -> bool:
        return any(isinstance(s, QuantModule) for s in m.modules())

    units: list[str] = []
    for name, m in model.named_modules():
        if any(name.startswith(f"{u}.") or name == u for u in units) or not name:
            continue
        if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) >= 2 and all(holds(c) for c in m):
            units += [f"{name}.{i}" for i in range(len(m))]
    inside = tuple(f"{u}." for u in units)
    units += [n for n, m in model.named_modules() if isinstance(m, QuantModule) and not n.startswith(inside)]
    return units


class _Soft(nn.Module):
    """A quantized layer computing with AdaRound's soft weight and straight-through activation quantization."""

    def __init__(self, qm: nn.Module, W: torch.Tensor) -> None:
        super().__init__()
        self.qm = qm
        q = qm.quantized_weight()
        self.q0 = q
        S, Z, self.qmax = _grid(q)
        self.S, self.Z = S.clone(), Z.clone()  # ordinary tensors: the layer's may be inference tensors
        self.shape = W.shape
        x = W.reshape(S.shape) / torch.where(S > 0, S, torch.ones_like(S)) + Z
        self.base = torch.floor(x)
        rest = (x - self.base).clamp(1e-4, 1 - 1e-4)
        self.V = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))
        self.act_grid = _static_grid(qm)
        self.drop = 0.0
        self.fixed: torch.Tensor | None = None  # a weight to compute with instead of the soft one (evaluation)

    def h(self) -> torch.Tensor:
        return _rect_sigmoid(self.V)

    def weight(self) -> torch.Tensor:
        if self.fixed is not None:
            return self.fixed
        return (self.S * ((self.base + self.h()).clamp(0, self.qmax) - self.Z)).reshape(self.shape)

    def hard_codes(self) -> QuantizedTensor:
        codes = (self.base + (self.h() >= 0.5).float()).clamp(0, self.qmax)
        q = self.q0
        return replace(q, codes=codes.to(torch.uint8).reshape(q.codes.shape))

    def _act(self, x: torch.Tensor) -> torch.Tensor:
        qm = self.qm
        if qm.act is None:
            return x
        if self.act_grid is None:
            fq = qm.quantize_input(x)
        else:  # the same codes as quantize_input, without its checks: it runs every step
            t, zp, lo, hi = self.act_grid
            fq = (torch.round(x / t + zp).clamp(lo, hi) - zp) * t
        xq = x + (fq - x).detach()  # straight-through
        if self.training and self.drop > 0:
            return torch.where(torch.rand_like(x) < self.drop, x, xq)
        return xq

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from lowbit.nn.conv import _CONV_FN, _QuantConv

        qm = self.qm
        b = None if qm.bias is None else qm.bias
        if isinstance(qm, _QuantConv):
            if qm.input_padding is not None:
                x = F.pad(x, qm.input_padding)
            return _CONV_FN[qm.ndim](self._act(x), self.weight(), b, qm.stride, qm.padding, qm.dilation, qm.groups)
        return F.linear(self._act(qm.transform_input(x)), self.weight(), b)


def _static_grid(qm: nn.Module) -> tuple[float, float, int, int] | None:
    """``(scale, zero point, lowest code, highest code)`` of a static per-tensor integer input quantizer, in the
    convention ``x_q = (clamp(round(x / scale + zp), lo, hi) - zp) * scale``; None for any other."""
    from lowbit.formats import quantize

    act = qm.act
    if act is None or act.dynamic or act.spec.format != "int" or act.spec.granularity != "tensor":
        return None
    lo, hi = qm.act_lo.float().reshape(1, 1), qm.act_hi.float().reshape(1, 1)
    q = quantize(torch.cat([lo, hi], dim=1), act.spec, lo, hi)
    scale = float((q.scale if q.global_scale is None else q.scale * q.global_scale).reshape(-1)[0])
    if scale <= 0:
        return None
    if q.zero_point is None:  # symmetric: codes -2^(b-1) .. 2^(b-1) - 1 around 0
        half = 2 ** (act.spec.bits - 1)
        return scale, 0.0, -half, half - 1
    return scale, float(q.zero_point.reshape(-1)[0]), 0, 2**act.spec.bits - 1


def _why_not(qm: nn.Module, fm: nn.Module | None) -> str | None:
    from lowbit.nn.conv import _QuantConv
    from lowbit.nn.linear import QuantLinear

    if not isinstance(qm, (QuantLinear, _QuantConv)):
        return f"a {type(qm).__name__}"
    if qm.spec.format != "int":
        return f"{qm.spec.name} is not an integer format"
    if getattr(qm, "input_scale", None) is not None:
        return "it scales its input per channel (AWQ)"
    if fm is None or getattr(fm, "weight", None) is None or fm.weight.numel() != qm.quantized_weight().codes.numel():
        return "no float layer of the same name and size in the float model"
    return None


def _optimize(model: nn.Module, name: str, softs: dict[str, _Soft], inputs: list, targets: list,
              config: Reconstruction, progress: bool) -> float:
    """Learn the rounding of ``softs`` (swapped into ``unit``) on ``inputs`` -> ``targets``; put the layers back
    with their hardened codes (or their old ones, if those were better). Returns the error ratio."""
    originals = {n: s.qm for n, s in softs.items()}
    for n, s in softs.items():
        _set(model, name, n, s)
    try:
        before = _error(model.get_submodule(name), inputs, targets, softs, hard=None)
        opt = torch.optim.Adam([s.V for s in softs.values()], lr=config.lr)
        warm = int(config.warmup * config.iters)
        g = torch.Generator().manual_seed(0)
        block = model.get_submodule(name)
        for s in softs.values():
            s.train()
            s.drop = config.drop
        bar = tqdm(range(config.iters), desc=name, unit="step", disable=not progress, leave=False)
        with torch.enable_grad():
            for it in bar:
                i = int(torch.randint(0, len(targets), (1,), generator=g))  # a stored batch, then rows of it
                n = targets[i].shape[0]
                sel = torch.randperm(n, generator=g)[:config.batch]
                args, kwargs = inputs[i]
                out = _first(block(*_rows(args, n, sel), **_rows(kwargs, n, sel)))
                loss = F.mse_loss(out, targets[i][sel]) / before
                if it >= warm:
                    t = (it - warm) / max(config.iters - warm, 1)
                    beta = config.beta[0] + (config.beta[1] - config.beta[0]) * t
                    reg = sum((1 - (2 * s.h() - 1).abs().pow(beta)).mean() for s in softs.values()) / len(softs)
                    loss = loss + config.reg * reg
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if it % 50 == 0:
                    bar.set_postfix(loss=f"{loss.item():.4f}")
        for s in softs.values():
            s.eval()
        hard = {n: s.hard_codes() for n, s in softs.items()}
        after = _error(block, inputs, targets, softs, hard=hard)
    finally:
        for n, qm in originals.items():
            _set(model, name, n, qm)
    ratio = after / before if before > 0 else 1.0
    if ratio > 1:
        log.info("reconstruct: %s ended with %.3gx its output error before; its codes are kept", name, ratio)
        return 1.0
    with torch.inference_mode():  # layers built during block-by-block calibration hold inference tensors
        for n, q in hard.items():
            originals[n].set_quantized_weight(q)
    log.info("reconstruct: %s output error %.3gx", name, ratio)
    return ratio


def _error(block: nn.Module, inputs: list, targets: list, softs: dict[str, _Soft], hard: dict | None) -> float:
    """Mean squared error of ``block`` over all stored inputs, with each soft layer's hardened codes (``hard``)
    or its codes as they were (None)."""
    for n, s in softs.items():
        s.eval()
        s.fixed = (s.q0 if hard is None else hard[n]).dequantize().reshape(s.shape)
    total, count = 0.0, 0
    try:
        with torch.no_grad():
            for (args, kwargs), t in zip(inputs, targets):
                total += float(F.mse_loss(_first(block(*args, **kwargs)), t, reduction="sum"))
                count += t.numel()
    finally:
        for s in softs.values():
            s.fixed = None
    return total / max(count, 1)


def _rows(x: Any, n: int, sel: torch.Tensor) -> Any:
    """``x`` (args tuple or kwargs dict, tuples inside them too: a transformer's ``position_embeddings``) with
    every batched tensor (see :func:`_batched`) cut to the rows ``sel``."""
    if isinstance(x, dict):
        return {k: _rows(v, n, sel) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_rows(v, n, sel) for v in x)
    return x[sel] if _batched(x, n) else x


def _batched(x: Any, n: int) -> bool:
    """Whether ``x`` is a tensor over the ``n`` samples: at least 2-D (so a 1-D position index of length ``n``
    is not taken for one) with ``n`` rows."""
    return torch.is_tensor(x) and x.dim() >= 2 and x.shape[0] == n


def _set(model: nn.Module, unit: str, inner: str, module: nn.Module) -> None:
    model.set_submodule(f"{unit}.{inner}" if inner else unit, module)


def _first(out: Any) -> torch.Tensor:
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    raise InputError(f"reconstruct: a block returned {type(out).__name__}; expected a tensor or a tuple starting "
                     f"with one")


class _Stop(Exception):
    pass


def _unit_inputs(model: nn.Module, name: str, data: Any) -> list[tuple[tuple, dict]]:
    """``(args, kwargs)`` the unit ``name`` is called with on each calibration batch (the rest of the model is
    not run: the forward stops at the unit)."""
    from lowbit.calibration.capture import batches, run_model

    found: list[tuple[tuple, dict]] = []

    def hook(mod, args, kwargs):
        found.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args),
                      {k: v.detach() if torch.is_tensor(v) else v for k, v in kwargs.items()}))
        raise _Stop

    handle = model.get_submodule(name).register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for i, batch in enumerate(batches(data, CAPTURE_ROWS)):
                try:
                    run_model(model, batch, check_fit=i == 0)
                except _Stop:
                    pass
    finally:
        handle.remove()
    if not found:
        raise InputError(f"reconstruct: {name} is never called on the calibration data")
    return _merged(found)


def _merged(calls: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    """The calls as one, their batched tensors concatenated (so steps sample rows from all of them), where every
    call has the same structure, batched tensors of the same shape after the batch dimension and the same
    other arguments (a rotary table with one row for the whole batch, say); otherwise the calls as given."""
    sizes = [_batch_of(c) for c in calls]
    if len(calls) == 1 or None in sizes:
        return calls

    def merge(values: list[Any], n: list[int]) -> Any:
        first = values[0]
        if isinstance(first, dict):
            if any(not isinstance(v, dict) or v.keys() != first.keys() for v in values):
                raise _Differ
            return {k: merge([v[k] for v in values], n) for k in first}
        if isinstance(first, (tuple, list)):
            if any(type(v) is not type(first) or len(v) != len(first) for v in values):
                raise _Differ
            return type(first)(merge([v[i] for v in values], n) for i in range(len(first)))
        if _batched(first, n[0]):
            if not all(_batched(v, k) and v.shape[1:] == first.shape[1:] for v, k in zip(values, n)):
                raise _Differ
            return torch.cat(values)
        if torch.is_tensor(first):
            if not all(torch.is_tensor(v) and v.shape == first.shape and torch.equal(v, first) for v in values):
                raise _Differ
            return first
        try:
            if not all(v is first or v == first for v in values):
                raise _Differ
        except (TypeError, RuntimeError):  # values that cannot be compared
            raise _Differ from None
        return first

    try:
        return [(merge([c[0] for c in calls], sizes), merge([c[1] for c in calls], sizes))]
    except _Differ:
        return calls


class _Differ(Exception):
    pass


def _batch_of(call: tuple[tuple, dict]) -> int | None:
    """The batch size of a call: the first dimension of its first tensor argument (None without one)."""
    args, kwargs = call
    first = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a)), None)
    return None if first is None or first.dim() == 0 else int(first.shape[0])


def _call_order(model: nn.Module, units: list[str], data: Any) -> list[str]:
    """``units`` in the order one forward pass on the first calibration batch first calls them."""
    from lowbit.calibration.capture import batches, run_model

    seen: list[str] = []
    handles = [model.get_submodule(u).register_forward_pre_hook(
        lambda mod, args, u=u: seen.append(u) if u not in seen else None) for u in units]
    try:
        with torch.no_grad():
            run_model(model, next(iter(batches(data))))
    except StopIteration:
        raise InputError("reconstruct: the calibration data is empty") from None
    finally:
        for h in handles:
            h.remove()
    return seen + [u for u in units if u not in seen]

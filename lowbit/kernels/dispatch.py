"""The dispatch table: which kernel runs which quantized module, decided once per module, with reasons.

Each :class:`Kernel` says what it can run (``why_not(module)`` returns None, or the reason it cannot) and
how to prepare a module for it (``pack(module)`` -> the kernel's own copy of the weight, in the layout its
matrix product reads). ``use_kernels`` walks a model, gives each quantized module the first kernel in
``KERNELS`` that fits, and returns a :class:`KernelReport` naming, per module, the kernel or the reasons
every kernel declined. Bias and input scale are read from the module on each call; the weight (and a
convolution's static activation range) are packed, so ``set_quantized_weight``, ``set_activation_range``
and moving the module drop its kernel (it falls back to the reference path: call ``use_kernels`` again).
Loading a state dict into a module with a kernel does not: call ``use_kernels`` after loading.

A kernel that packs its own copy of the weight (``owns_weight``) doubles the weight's memory while the
module's storage is kept. ``use_kernels(model, keep_reference=False)`` drops that storage
(``QuantModule.release_storage``): the model then holds each weight once, in the kernel's layout, and the
reference path, saving and moving it raise a clear error until the model is loaded again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from lowbit.kernels import conv_int8, embedding, int4, int4_avx2, int8, int8_avx2, w4a8, w4a8_avx2, w8a8_avx2
from lowbit.errors import InputError
from lowbit.nn.base import KERNEL_ATTR, QuantModule


@dataclass(frozen=True)
class Kernel:
    """One fast path: ``why_not(m)`` -> None or a reason; ``pack(m)`` -> state; ``run(m, state, x)`` -> y."""

    name: str
    summary: str
    why_not: Callable[[QuantModule], str | None]
    pack: Callable[[QuantModule], Any]
    run: Callable[[QuantModule, Any, torch.Tensor], torch.Tensor]
    owns_weight: bool = True  # pack() makes its own copy of the weight (False: run() reads the module's storage)


@dataclass(frozen=True)
class Packed:
    """What ``use_kernels`` attaches to a module: its kernel and that kernel's copy of the weight."""

    kernel: Kernel
    state: Any

    def __call__(self, m: QuantModule, x: torch.Tensor) -> torch.Tensor:
        return self.kernel.run(m, self.state, x)

    def nbytes(self) -> int:
        tensors = self.state.values() if isinstance(self.state, dict) else ()
        return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


# in order of preference; the first that fits a module runs it
KERNELS: tuple[Kernel, ...] = (
    Kernel("int4-weight-avx2", "4-bit integer weights (per channel, or groups of a multiple of 32), float32 "
           "activations: lowbit's C++ kernel reading the packed codes for few rows, the weight unpacked to float32 "
           "for a float product for many; built on first use", int4_avx2.why_not, int4_avx2.pack, int4_avx2.run),
    Kernel("int4-weight-bf16", "4-bit integer weights in groups of 32-256 (or per channel), bf16 activations: "
           "torch's int4 CPU matmul (_weight_int4pack_mm_for_cpu)", int4.why_not, int4.pack, int4.run),
    Kernel("w8a8-avx2", "8-bit per-channel weights x 8-bit activations (dynamic per token or per tensor, or "
           "static per tensor) on CPUs without VNNI: each code split into two 4-bit halves for lowbit's C++ W4A8 "
           "kernel (exact)", w8a8_avx2.why_not, w8a8_avx2.pack, w8a8_avx2.run),
    Kernel("w8a8-int-mm", "8-bit per-channel weights x 8-bit activations (dynamic per token or per tensor, or "
           "static per tensor): int8 x int8 -> int32 (torch._int_mm, VNNI), exact integer correction terms",
           int8.w8a8_why_not, int8.w8a8_pack, int8.w8a8_run),
    Kernel("w4a8-avx2", "4-bit integer weights (per channel, or groups of a multiple of 32) x 8-bit activations "
           "(dynamic per token or per tensor, or static per tensor): lowbit's C++ kernel (AVX2 vpmaddubsw, exact "
           "int32 sums per group), reading the packed 4-bit codes; built on first use", w4a8_avx2.why_not,
           w4a8_avx2.pack, w4a8_avx2.run),
    Kernel("w4a8-int-mm", "4-bit integer weights (per channel, or groups of a multiple of 8) x 8-bit activations "
           "(dynamic per token or per tensor, or static per tensor): int8 x int8 -> int32 per group "
           "(torch._int_mm), exact integer corrections; the codes widened to int8 in memory", w4a8.why_not,
           w4a8.pack, w4a8.run),
    Kernel("int8-weight-avx2", "8-bit per-channel integer weights, float32 activations: lowbit's C++ kernel for few "
           "rows, the weight dequantized to float32 for a float product for many; built on first use",
           int8_avx2.why_not, int8_avx2.pack, int8_avx2.run),
    Kernel("int8-weight-bf16", "8-bit per-channel integer weights, bf16 activations: torch's int8 CPU matmul "
           "(_weight_int8pack_mm)", int8.weight_only_why_not, int8.weight_only_pack, int8.weight_only_run),
    Kernel("conv-int8-onednn", "8-bit per-channel symmetric conv weights x static per-tensor 8-bit activations: "
           "oneDNN int8 convolution with float output (CPUs with VNNI or AMX only)",
           conv_int8.why_not, conv_int8.pack, conv_int8.run),
    Kernel("embedding-rows", "quantized embedding of any format with per-row scales: gathers and dequantizes "
           "only the looked-up rows (exact)", embedding.why_not, embedding.pack, embedding.run, owns_weight=False),
)


@dataclass
class KernelReport:
    """Per quantized module (by name): the kernel it runs, or None and the reasons each kernel declined."""

    chosen: dict[str, str | None] = field(default_factory=dict)
    reasons: dict[str, dict[str, str]] = field(default_factory=dict)
    packed_bytes: int = 0

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for k in self.chosen.values():
            out[k or "reference"] = out.get(k or "reference", 0) + 1
        return out

    def describe(self) -> str:
        """One line per kernel with its module count, then each reference module with its reasons."""
        lines = [f"{n} module(s): {k}" for k, n in sorted(self.counts().items())]
        for name, k in self.chosen.items():
            if k is None:
                why = "; ".join(f"{kn}: {r}" for kn, r in self.reasons[name].items())
                lines.append(f"  {name} stays on the reference path ({why})")
        return "\n".join(lines)


def use_kernels(model: nn.Module, kernels: tuple[Kernel, ...] = KERNELS, *,
                keep_reference: bool = True) -> KernelReport:
    """Attach to every quantized module of ``model`` the first of ``kernels`` that can run it.

    Most kernels hold their own packed copy of the weight (``KernelReport.packed_bytes`` in all). With
    ``keep_reference=True`` the module's storage is unchanged, so saving and the reference path work as
    before; with False it is dropped where a kernel holds a copy (see the module docstring).
    """
    report = KernelReport()
    for name, m in model.named_modules():
        if not isinstance(m, QuantModule) or not hasattr(m, "reference"):
            continue
        if m.storage_released:
            if kernel_name(m) is None:
                raise InputError(f"{name}: its weight storage was released and it has no kernel; load the model again")
            report.chosen[name] = kernel_name(m)
            report.packed_bytes += m.__dict__[KERNEL_ATTR].nbytes()
            continue
        m.__dict__.pop(KERNEL_ATTR, None)
        reasons = {}
        for k in kernels:
            why = why_not_device(m) or k.why_not(m)
            if why is None:
                packed = Packed(k, k.pack(m))
                object.__setattr__(m, KERNEL_ATTR, packed)
                report.chosen[name] = k.name
                report.packed_bytes += packed.nbytes()
                if not keep_reference and k.owns_weight:
                    m.release_storage()
                break
            reasons[k.name] = why
        else:
            report.chosen[name] = None
            report.reasons[name] = reasons
    return report


def release_kernels(model: nn.Module) -> None:
    """Put every quantized module of ``model`` back on the reference path (none may have released storage)."""
    quantized = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantModule)]
    released = [name for name, m in quantized if m.storage_released]
    if released:
        more = f" and {len(released) - 1} more" if len(released) > 1 else ""
        raise InputError(f"{released[0]}{more}: weight storage was handed to the kernel "
                         f"(use_kernels(..., keep_reference=False)); load the model again for the reference path")
    for _, m in quantized:
        m.__dict__.pop(KERNEL_ATTR, None)


def kernel_name(m: nn.Module) -> str | None:
    """The kernel ``m`` runs, or None (reference path, or not a quantized module)."""
    packed = m.__dict__.get(KERNEL_ATTR)
    return None if packed is None else packed.kernel.name


def why_not_device(m: QuantModule) -> str | None:
    """Why no kernel runs ``m`` whatever its shape: its device, or k-quant scales (no kernel reads those yet)."""
    if m.spec.has_super_scale:
        return f"{m.spec.name} has k-quant scales, which no lowbit kernel reads (the reference path runs it)"
    return None if m.qweight.device.type == "cpu" else f"its weight is on {m.qweight.device}, kernels are CPU only"

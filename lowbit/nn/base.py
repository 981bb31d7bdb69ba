"""Storage shared by every quantized module: packed codes, encoded scales, zero points, activation range.

A quantized module keeps no float copy of its weight. Its buffers (all in the state dict, so they save
bit-exactly) are:

============  ===========================  ===============================================
qweight       uint8 ``(nbytes,)``          element codes packed ``spec.bits`` wide
scale         ``(gr, gc)`` storage dtype   scales encoded in ``spec.scale_format``
zero_point    uint8 ``(gr, gc)``           asymmetric integers only
global_scale  float32 ``()``               NVFP4-style fp8 scales only
super_scale   float16 ``(gr, ns)``         k-quant scales only: fp16 scale per 256 elements (``scale``: uint8
                                           integers times it; ``zero_point``: the integer minimums, see below)
super_min     float16 ``(gr, ns)``         k-quant formats with a float minimum only: the minimums' fp16 scale
act_lo/hi     float32 ``(1, 1)``           static activation quantization only
input_scale   float32 ``(in_features,)``   linears with a per-input-feature scale only (AWQ)
============  ===========================  ===============================================

``input_scale`` multiplies the input before everything else (activation quantization included): the layer
computes ``F.linear(quantize_input(x * input_scale), dequantize(W), b)``. For AWQ it is ``1 / s``.

Inside ``lowbit.nn.cached_weights(model)`` a module dequantizes its weight once per dtype and device and
reuses it (an attribute of the instance, set and removed by that context manager).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.formats import (
    QuantizedTensor,
    fake_quantize,
    fake_quantize_dynamic,
    grid_shape,
    pack,
    packed_nbytes,
    unpack,
)
from lowbit.formats.scales import decode_scale, encode_scale, super_expand
from lowbit.spec import ActivationQuant, QuantSpec

# buffers that keep their dtype (and whose dtype lowbit.load checks exactly)
STORAGE_BUFFERS = ("qweight", "scale", "zero_point", "global_scale", "super_scale", "super_min", "act_lo", "act_hi",
                   "input_scale")
CACHE_ATTR = "_dequant_cache"  # instance attribute: {(dtype, device): dequantized weight}, see nn.cache
KERNEL_ATTR = "_kernel"  # instance attribute: the fast path ``(module, x) -> y`` set by lowbit.kernels.use_kernels
RELEASED_ATTR = "_storage_released"  # instance attribute: True once the kernel holds the only copy of the weight
_SCALE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "e8m0": torch.uint8,
                 "fp8_e4m3": torch.uint8, "k4": torch.uint8, "k6": torch.uint8, "k8": torch.uint8}


class LazyWeight(torch.Tensor):
    """A quantized module's float weight whose values are computed only when used.

    ``dtype``, ``shape`` and ``device`` are plain tensor metadata; any torch operation on the tensor (indexing,
    a view, arithmetic, ``torch.equal``...) runs on :meth:`materialize`'s result, the module's
    ``effective_weight``. So model code that only looks at a layer's weight dtype, as T5's feed-forward does
    before every call, no longer dequantizes the whole weight for it.
    """

    @staticmethod
    def __new__(cls, module: "QuantModule", dtype: torch.dtype):
        t = torch.Tensor._make_wrapper_subclass(cls, tuple(module.weight_shape), dtype=dtype,
                                                device=module.qweight.device, requires_grad=False)
        t._module = module
        return t

    def materialize(self) -> torch.Tensor:
        """The weight's values: the module's ``effective_weight`` in this tensor's dtype."""
        return self._module.effective_weight(self.dtype)

    def __repr__(self, *, tensor_contents=None) -> str:  # noqa: D105 - torch passes tensor_contents
        return f"LazyWeight({self.materialize()!r})"

    @classmethod
    def __torch_dispatch__(cls, func, types, args=(), kwargs=None):
        from torch.utils._pytree import tree_map

        def real(t):
            return t.materialize() if isinstance(t, LazyWeight) else t

        return func(*tree_map(real, args), **tree_map(real, kwargs or {}))


class QuantModule(nn.Module):
    """Base of the quantized modules: owns the weight storage and the activation quantizer."""

    def _init_storage(
        self,
        weight_shape: tuple[int, ...],
        spec: QuantSpec,
        act: ActivationQuant | None,
        input_features: int | None = None,
    ) -> None:
        """Register the storage buffers; ``input_features`` adds an ``input_scale`` of ones of that length."""
        self.spec = spec
        self.act = act
        self.weight_shape = tuple(int(d) for d in weight_shape)
        numel = math.prod(self.weight_shape)
        grid = grid_shape(spec, self.weight_shape)
        self.register_buffer("qweight", torch.zeros(packed_nbytes(numel, spec.bits), dtype=torch.uint8))
        self.register_buffer("scale", torch.zeros(grid, dtype=_SCALE_DTYPES[spec.scale_format]))
        if spec.has_zero_point:
            self.register_buffer("zero_point", torch.zeros(grid, dtype=torch.uint8))
        else:
            self.zero_point = None
        if spec.has_global_scale:
            self.register_buffer("global_scale", torch.ones((), dtype=torch.float32))
        else:
            self.global_scale = None
        supers = (grid[0], -(-grid[1] // spec.tiles_per_super)) if spec.has_super_scale else None
        for name, wanted in (("super_scale", spec.has_super_scale), ("super_min", spec.has_float_min)):
            if wanted:
                self.register_buffer(name, torch.zeros(supers, dtype=torch.float16))
            else:
                setattr(self, name, None)
        if act is not None and not act.dynamic:
            self.register_buffer("act_lo", torch.zeros(1, 1))
            self.register_buffer("act_hi", torch.zeros(1, 1))
        else:
            self.act_lo = self.act_hi = None
        if input_features is not None:
            self.register_buffer("input_scale", torch.ones(int(input_features), dtype=torch.float32))
        else:
            self.input_scale = None

    def _apply(self, fn, recurse=True):
        """``.to(device)`` moves the storage; ``.to(dtype)`` / ``.half()`` must not cast it.

        torch casts every floating buffer, which would round fp32/fp16 scales (and the global scale and
        activation range) to the new dtype and silently change the weight. Storage keeps its dtype and
        follows only the device; the bias is cast like any float module's. Forward computes in the
        input's dtype either way.
        """
        self.require_storage("moving or casting it")
        kept = {n: t for n in STORAGE_BUFFERS if isinstance(t := getattr(self, n, None), torch.Tensor)}
        cache = self.__dict__.get(CACHE_ATTR)
        if cache is not None:
            cache.clear()
        self.__dict__.pop(KERNEL_ATTR, None)  # packed for the old device; use_kernels again after moving
        super()._apply(fn, recurse)
        for n, t in kept.items():
            applied = self._buffers[n]
            if applied is not None and applied.dtype != t.dtype:
                self._buffers[n] = t.to(applied.device)
        return self

    # ---- weight -------------------------------------------------------------------------------------

    def set_quantized_weight(self, q: QuantizedTensor) -> None:
        """Store ``q`` (its spec and shape must be this module's)."""
        self.require_storage("storing a new weight")
        if q.spec != self.spec or tuple(q.shape) != self.weight_shape:
            raise ValueError(f"quantized weight {q.spec.name} {tuple(q.shape)} does not fit "
                             f"{self.spec.name} {self.weight_shape}")
        self.qweight.copy_(pack(q.codes, self.spec.bits))
        if self.spec.has_super_scale:  # the tile scales as integers of the super-block scale
            self.super_scale.copy_(q.super_scale)
            self.scale.copy_(q.scale_codes)
            if self.super_min is not None:
                self.super_min.copy_(q.super_min)
        else:
            self.scale.copy_(encode_scale(q.scale, self.spec.scale_format))
        if self.zero_point is not None:
            self.zero_point.copy_(q.zero_point)
        if self.global_scale is not None:
            self.global_scale.copy_(q.global_scale)
        cache = self.__dict__.get(CACHE_ATTR)
        if cache is not None:
            cache.clear()
        self.__dict__.pop(KERNEL_ATTR, None)  # packed from the old weight

    def set_input_scale(self, input_scale: torch.Tensor) -> None:
        """Store the per-input-feature scale (float ``(in_features,)``, finite, > 0) the input is multiplied by."""
        if getattr(self, "input_scale", None) is None:
            raise InputError(f"this {type(self).__name__} has no input scale; build it with one")
        if not isinstance(input_scale, torch.Tensor) or tuple(input_scale.shape) != tuple(self.input_scale.shape):
            got = tuple(input_scale.shape) if isinstance(input_scale, torch.Tensor) else type(input_scale).__name__
            raise InputError(f"input_scale must be a tensor of shape {tuple(self.input_scale.shape)} "
                             f"(one per input feature), got {got}")
        t = input_scale.detach().float()
        if not torch.isfinite(t).all() or bool((t <= 0).any()):
            raise InputError("input_scale must be finite and positive (AWQ's 1 / s)")
        self.input_scale.copy_(t)

    def release_storage(self) -> None:
        """Drop the packed weight (codes, scales, zero points), keeping its shapes' record in ``weight_shape``.

        Called by ``lowbit.kernels.use_kernels(..., keep_reference=False)`` once a kernel holds its own copy, so
        the weight is not in memory twice. Afterwards only that kernel can run the module: the reference path,
        saving, moving and storing a new weight raise :class:`InputError`. Load the model again to get them back.
        """
        for n in ("qweight", "scale", "zero_point", "super_scale", "super_min"):
            t = self._buffers.get(n)
            if t is not None:
                self._buffers[n] = t.new_empty(0)
        cache = self.__dict__.get(CACHE_ATTR)
        if cache is not None:
            cache.clear()
        object.__setattr__(self, RELEASED_ATTR, True)

    @property
    def storage_released(self) -> bool:
        return bool(self.__dict__.get(RELEASED_ATTR, False))

    def require_storage(self, what: str) -> None:
        """Raise a clear :class:`InputError` naming ``what`` when ``release_storage`` has dropped the weight."""
        if self.storage_released:
            raise InputError(f"{type(self).__name__} {self.weight_shape}: {what} needs the packed weight, which was "
                             f"handed to its kernel (use_kernels(..., keep_reference=False)); load the model again")

    def quantized_weight(self) -> QuantizedTensor:
        """The stored weight as codes and fp32 scales (unpacked)."""
        self.require_storage("the reference path (or reading the weight)")
        codes = unpack(self.qweight, self.spec.bits, math.prod(self.weight_shape)).reshape(self.weight_shape)
        if self.spec.has_super_scale:
            d = self.super_scale.float()
            scale = self.scale.float() * super_expand(d, self.spec.tiles_per_super, self.scale.shape[1])
            dmin = None if self.super_min is None else self.super_min.float()
            return QuantizedTensor(codes, scale, self.zero_point, None, self.spec, d, dmin)
        scale = decode_scale(self.scale, self.spec.scale_format)
        return QuantizedTensor(codes, scale, self.zero_point, self.global_scale, self.spec)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight a reference forward computes with: ``weight_shape`` in ``dtype``.

        Inside ``cached_weights`` the result is computed once per (dtype, device) and reused: do not modify it.
        """
        cache = self.__dict__.get(CACHE_ATTR)
        if cache is None:
            return self.quantized_weight().dequantize(dtype)
        key = (dtype, self.qweight.device)
        if key not in cache:
            cache[key] = self.quantized_weight().dequantize(dtype)
        return cache[key]

    def effective_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight the module applies to its (unquantized) input: ``weight_shape`` in ``dtype``.

        The dequantized weight times ``input_scale`` per input column (a convolution's per input channel;
        computed in float32), or just the dequantized weight when the module has no input scale.
        """
        scale = getattr(self, "input_scale", None)
        if scale is None:
            return self.dequantized_weight(dtype)
        w = self.dequantized_weight(torch.float32)  # (out, in) or a convolution's (out, in, *kernel)
        return (w * scale.reshape(1, -1, *([1] * (w.dim() - 2)))).to(dtype)  # times the scale per input

    @property
    def weight(self) -> torch.Tensor:
        """The float weight the module applies (:meth:`effective_weight`, float32, ``weight_shape``), for model
        code that reads a layer's ``.weight`` itself: its dtype (T5's feed-forward on every call, ViT's patch
        embedding) or its values (Mamba's depthwise convolution). A :class:`LazyWeight`: its dtype, shape and
        device cost nothing, and its values are dequantized when an operation uses them (each time, outside
        ``cached_weights``); assigning to it does not change the stored weight."""
        return LazyWeight(self, torch.float32)

    def storage_bytes(self) -> int:
        """Bytes of the quantized weight's storage (codes, scales, zero points, input scale), excluding bias."""
        parts = [self.qweight, self.scale, self.zero_point, self.global_scale, self.super_scale, self.super_min,
                 getattr(self, "input_scale", None)]
        return sum(t.numel() * t.element_size() for t in parts if t is not None)

    def bits_per_weight(self) -> float:
        return 8 * self.storage_bytes() / math.prod(self.weight_shape)

    def add_to_bias(self, delta: torch.Tensor) -> None:
        """``bias += delta`` (``(out,)``), creating a zero bias first if the layer has none."""
        if getattr(self, "bias", None) is None:
            self.bias = nn.Parameter(torch.zeros(delta.shape[0]), requires_grad=False)
        self.bias.data.add_(delta.to(self.bias.dtype))

    # ---- activations --------------------------------------------------------------------------------

    def set_activation_range(self, lo: torch.Tensor, hi: torch.Tensor) -> None:
        if self.act_lo is None:
            raise ValueError("this module has no static activation quantizer")
        self.act_lo.copy_(lo.reshape(1, 1))
        self.act_hi.copy_(hi.reshape(1, 1))
        self.__dict__.pop(KERNEL_ATTR, None)  # a kernel may have packed the old range

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the input on its ``(tokens, features)`` view (identity without ``act``)."""
        if self.act is None:
            return x
        x2 = x.reshape(-1, x.shape[-1]) if x.dim() != 2 else x
        if self.act.dynamic:
            y = fake_quantize_dynamic(x2, self.act.spec, self.act.clip)
        else:
            y = fake_quantize(x2, self.act.spec, self.act_lo, self.act_hi)
        return y.reshape(x.shape)

    def _describe(self) -> str:
        s = f"weight={self.spec.name}"
        if getattr(self, "input_scale", None) is not None:
            s += ", input_scale"
        if self.act is not None:
            s += f", act={self.act.name}"
        return s

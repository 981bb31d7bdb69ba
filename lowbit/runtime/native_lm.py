"""lowbit's decode engine for Llama-family causal LMs: one C++ call per token, a static key/value cache.

Why C++ and not ``torch.compile``: on SmolLM2-135M a decode step of the eager Hugging Face model is about 1,100
torch dispatches (30 layers of norms, projections, rotary embedding, attention, residuals), a few microseconds
each, which is most of a step once the 4-bit products themselves take microseconds; and lowbit's kernels are
ctypes calls that a compiled graph can only call back into one by one. ``csrc/decode_step.cpp`` runs the whole
step (every layer, the final norm, the head) in one call and one OpenMP team. With ``exact=True`` its linears
are the same single-token float tiles as lowbit's per-layer kernels (``int4-weight-avx2``, ``int8-weight-avx2``;
float32 for unquantized linears), so the logits are the reference path's up to float32 rounding order. By
default, on CPUs with AVX-512 VNNI, 4-bit linears with groups of a multiple of 64 take the token's activations in
int8 blocks of 32 and integer dot products (``csrc/w4_vnni.h``), as llama.cpp's Q8_0 does: faster, at +0.38%
perplexity on SmolLM2-135M (``benchmarks/decode_quality.py``). ``benchmarks/speed.py --sections engines``
measures them against the eager model and llama.cpp.

What it runs (:func:`why_not` says what it refuses, and why): a Hugging Face ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM`` or ``Qwen3ForCausalLM`` (so SmolLM, TinyLlama, ...), each linear
either float or a lowbit layer on one of those two kernels (an AWQ ``input_scale`` is applied; an online
rotation is not supported), RMSNorm, SiLU-gated MLP, rotary embedding (the tables come from the model's own
rotary module, so its scaling type is honoured), grouped-query attention, no sliding window shorter than the
cache. The embedding runs in torch (one lookup per token). Everything else: :mod:`lowbit.runtime.generate`
decodes it eagerly instead.

The prompt goes through ``csrc/prefill.cpp`` in one call per :data:`PREFILL_CHUNK` tokens where every linear
takes the integer path (each block of weight rows read once for all the prompt's tokens); otherwise the model
itself processes it in torch (a batched forward pass) and its keys and values are copied into the engine's cache.
"""

from __future__ import annotations

import ctypes
from typing import Any

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit import native
from lowbit.nn.base import KERNEL_ATTR, QuantModule

ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3")
_KINDS = {"int4-weight-avx2": 1, "int8-weight-avx2": 2}
PREFILL_CHUNK = 256  # prompt tokens per engine call (its buffers grow with this)
EMBEDDING_CACHE_ROWS = 4096  # embedding rows kept as float32 by NativeLM.step (9 MB for SmolLM2)
_P = ctypes.c_void_p
_I = ctypes.c_int32


class _Linear(ctypes.Structure):
    _fields_ = [("kind", _I), ("n", _I), ("rows", _I), ("k", _I), ("group", _I), ("w", _P), ("z", _P), ("zt", _P),
                ("s", _P),
                ("o", _P), ("bias", _P), ("in_scale", _P)]


_PROJ = ("q", "k", "v", "o", "gate", "up", "down")


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", _P), ("mlp_norm", _P), ("q_norm", _P), ("k_norm", _P)] + \
        [(p, _Linear) for p in _PROJ]


class _Model(ctypes.Structure):
    _fields_ = [(f, _I) for f in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter", "max_len",
                                  "max_rows", "exact")] + \
        [("eps", ctypes.c_float), ("attn_scale", ctypes.c_float), ("layers", _P), ("final_norm", _P),
         ("head", _Linear), ("rope_cos", _P), ("rope_sin", _P), ("k_cache", _P), ("v_cache", _P)]


def why_not(model: nn.Module) -> str | None:
    """None when :class:`NativeLM` can run ``model``, else the first reason it cannot."""
    try:
        _Parts(model)
    except _Refused as e:
        return str(e)
    return native.why_unavailable()


class _Refused(Exception):
    pass


class _Parts:
    """The modules the engine reads, found and checked (raises :class:`_Refused` with the reason)."""

    def __init__(self, model: nn.Module) -> None:
        cfg = getattr(model, "config", None)
        kind = getattr(cfg, "model_type", None)
        if kind not in ARCHITECTURES:
            raise _Refused(f"model type {kind!r} is not one the decode engine runs ({', '.join(ARCHITECTURES)})")
        away = next((t.device for t in [*model.parameters(), *model.buffers()] if t.device.type != "cpu"), None)
        if away is not None:
            raise _Refused(f"the model is on {away}; the engine runs on the CPU")
        body = getattr(model, "model", None)
        self.layers = list(getattr(body, "layers", []))
        if not self.layers or not all(hasattr(body, a) for a in ("embed_tokens", "norm", "rotary_emb")):
            raise _Refused("the model has no model.layers / embed_tokens / norm / rotary_emb")
        self.embed, self.norm, self.rotary, self.body = body.embed_tokens, body.norm, body.rotary_emb, body
        self.head = getattr(model, "lm_head", None)
        if self.head is None:
            raise _Refused("the model has no lm_head")
        act = getattr(cfg, "hidden_act", "silu")
        if act != "silu":
            raise _Refused(f"hidden_act {act!r}: the engine's MLP is SiLU-gated")
        # a sliding window is only honoured as a cap on the cache (reserve() refuses longer sequences)
        self.window = getattr(cfg, "sliding_window", None) if getattr(cfg, "use_sliding_window", True) else None
        types = set(getattr(cfg, "layer_types", None) or ())
        if types - {"full_attention", "sliding_attention"} or ("sliding_attention" in types and not self.window):
            raise _Refused(f"layer types {sorted(types)}: the engine has full attention only")
        att0 = self.layers[0].self_attn
        self.head_dim = int(getattr(att0, "head_dim", cfg.hidden_size // cfg.num_attention_heads))
        self.n_heads = int(cfg.num_attention_heads)
        self.n_kv = int(getattr(cfg, "num_key_value_heads", None) or self.n_heads)
        self.scale = float(getattr(att0, "scaling", self.head_dim ** -0.5))
        self.eps = None
        for i, layer in enumerate(self.layers):
            att, mlp = getattr(layer, "self_attn", None), getattr(layer, "mlp", None)
            for owner, names in ((att, ("q_proj", "k_proj", "v_proj", "o_proj")),
                                 (mlp, ("gate_proj", "up_proj", "down_proj"))):
                for n in names:
                    _check_linear(f"model.layers.{i}.{n}", getattr(owner, n, None))
            for n in ("input_layernorm", "post_attention_layernorm"):
                self._check_norm(f"model.layers.{i}.{n}", getattr(layer, n, None))
            for n in ("q_norm", "k_norm"):
                if getattr(att, n, None) is not None:
                    self._check_norm(f"model.layers.{i}.self_attn.{n}", getattr(att, n))
            if float(getattr(att, "scaling", self.scale)) != self.scale:
                raise _Refused(f"model.layers.{i}: attention scaling differs between layers")
        self._check_norm("model.norm", self.norm)
        _check_linear("lm_head", self.head)

    def _check_norm(self, name: str, m: Any) -> None:
        if m is None or not type(m).__name__.endswith("RMSNorm") or "Gemma" in type(m).__name__:
            raise _Refused(f"{name} is {type(m).__name__}, not an RMSNorm the engine computes (x * rsqrt * weight)")
        eps = float(getattr(m, "variance_epsilon", getattr(m, "eps", 1e-6)))
        if self.eps is None:
            self.eps = eps
        elif eps != self.eps:
            raise _Refused(f"{name} has epsilon {eps}, other norms {self.eps}")


def _check_linear(name: str, m: Any) -> None:
    if isinstance(m, QuantModule):
        packed = m.__dict__.get(KERNEL_ATTR)
        if packed is None:
            if m.storage_released:
                raise _Refused(f"{name} has no kernel and no weight")
            return  # use_kernels() may still give it one; NativeLM checks again after that
        if packed.kernel.name not in _KINDS:
            raise _Refused(f"{name} runs {packed.kernel.name}; the engine reads {' or '.join(_KINDS)} layers "
                           f"(weight-only) and float linears")
        if getattr(m, "input_rotation", None) is not None:
            raise _Refused(f"{name} rotates its input online (not supported by the engine)")
        return
    if type(m) is not nn.Linear:
        raise _Refused(f"{name} is {type(m).__name__}; the engine reads nn.Linear and lowbit's QuantLinear")


class NativeLM:
    """A causal LM on lowbit's C++ decode step (see the module docstring). ``max_len``: positions the cache
    holds (grown by :meth:`reserve`).

    >>> lm = NativeLM(model)              # model: loaded by lowbit.load or Hugging Face, see why_not()
    >>> logits = lm.prefill(prompt_ids)   # (vocab,) float32 for the last prompt token
    >>> logits = lm.step(token, pos)      # the next token at position pos (== prompt length first)
    """

    def __init__(self, model: nn.Module, max_len: int = 512, *, exact: bool = False) -> None:
        from lowbit.kernels import use_kernels

        why = why_not(model)
        if why is not None:
            raise InputError(f"the decode engine cannot run this model: {why}")
        if any(isinstance(m, QuantModule) and KERNEL_ATTR not in m.__dict__ for m in model.modules()):
            use_kernels(model)
            why = why_not(model)
            if why is not None:
                raise InputError(f"the decode engine cannot run this model: {why}")
        self.model = model
        self.parts = p = _Parts(model)
        self._keep: list[torch.Tensor] = []
        self._fn = native.function("lowbit_decode_step")
        self._rows: dict[int, torch.Tensor] = {}
        self.threads = torch.get_num_threads()
        layers = (_Layer * len(p.layers))()
        rows = 0
        for i, layer in enumerate(p.layers):
            att, mlp = layer.self_attn, layer.mlp
            L = layers[i]
            L.attn_norm = self._ptr(layer.input_layernorm.weight)
            L.mlp_norm = self._ptr(layer.post_attention_layernorm.weight)
            L.q_norm = self._ptr(att.q_norm.weight) if getattr(att, "q_norm", None) is not None else None
            L.k_norm = self._ptr(att.k_norm.weight) if getattr(att, "k_norm", None) is not None else None
            for short, owner, name in (("q", att, "q_proj"), ("k", att, "k_proj"), ("v", att, "v_proj"),
                                       ("o", att, "o_proj"), ("gate", mlp, "gate_proj"), ("up", mlp, "up_proj"),
                                       ("down", mlp, "down_proj")):
                setattr(L, short, self._linear(getattr(owner, name)))
                rows = max(rows, getattr(L, short).rows)
        self._layers = layers
        s = self._struct = _Model()
        cfg = model.config
        s.n_layers, s.hidden = len(p.layers), int(cfg.hidden_size)
        s.n_heads, s.n_kv, s.head_dim = p.n_heads, p.n_kv, p.head_dim
        s.inter = int(p.layers[0].mlp.gate_proj.out_features)
        s.eps, s.attn_scale = p.eps, p.scale
        s.exact = int(bool(exact))
        self.exact = bool(exact)
        s.layers = ctypes.addressof(layers)
        s.final_norm = self._ptr(p.norm.weight)
        s.head = self._linear(p.head)
        s.max_rows = max(rows, s.head.rows)
        self.vocab = int(s.head.n)
        self.max_len = 0
        self.reserve(max_len)
        rc = native.function("lowbit_decode_check")(ctypes.addressof(s))
        if rc:
            where = "the head or the model's sizes" if rc == s.n_layers + 1 else f"model.layers.{rc - 1}"
            raise InputError(f"the decode engine refused the shapes of {where}")

    # -- set-up --------------------------------------------------------------------------------------

    def _ptr(self, t: torch.Tensor | None) -> int | None:
        """Address of ``t`` as contiguous float32 (a converted copy where needed), or None. The tensor is kept
        alive here, so the engine's pointers stay valid whatever later happens to the model's modules."""
        if t is None:
            return None
        t = t.detach()
        if t.dtype != torch.float32 or not t.is_contiguous():
            t = t.float().contiguous()
        self._keep.append(t)
        return t.data_ptr()

    def _linear(self, m: nn.Module) -> _Linear:
        L = _Linear()
        L.k = int(m.in_features)
        L.n = L.rows = int(m.out_features)
        L.bias = self._ptr(m.bias)
        if isinstance(m, QuantModule):
            packed = m.__dict__[KERNEL_ATTR]
            st = packed.state
            self._keep.append(st)  # the kernel's packed tensors, alive even if use_kernels() packs the module again
            L.kind = _KINDS[packed.kernel.name]
            L.w, L.s = st["weight"].data_ptr(), st["scale"].data_ptr()
            if L.kind == 1:
                L.rows, L.group, L.z = int(st["n"]), int(st["group"]), st["zero"].data_ptr()
                zt = st["zero"].t().contiguous()  # (groups, rows): the integer tile reads 8 rows' at once
                self._keep.append(zt)
                L.zt = zt.data_ptr()
                if m.bias is not None and L.rows != L.n:
                    L.bias = self._ptr(torch.nn.functional.pad(m.bias.float(), (0, L.rows - L.n)))
            elif "code_offset" in st:
                L.o = st["code_offset"].data_ptr()
            L.in_scale = self._ptr(m.input_scale) if m.input_scale is not None else None
        else:
            L.kind = 0
            L.w = self._ptr(m.weight)
        return L

    def reserve(self, max_len: int) -> None:
        """Make room for ``max_len`` positions (the cache's contents are kept)."""
        if max_len <= self.max_len:
            return
        window = self.parts.window
        if window is not None and max_len > window:
            raise InputError(f"the decode engine has no sliding window; this model attends to {window} positions, "
                             f"so it decodes at most that many here (asked for {max_len})")
        s, p = self._struct, self.parts
        shape = (s.n_layers, s.n_kv, max_len, s.head_dim)
        k, v = torch.zeros(shape), torch.zeros(shape)
        if self.max_len:
            k[:, :, :self.max_len] = self.k_cache
            v[:, :, :self.max_len] = self.v_cache
        self.k_cache, self.v_cache = k, v
        with torch.no_grad():
            cos, sin = p.rotary(torch.zeros(1), torch.arange(max_len)[None])
        self.cos, self.sin = cos[0].float().contiguous(), sin[0].float().contiguous()
        s.max_len = self.max_len = max_len
        s.k_cache, s.v_cache = k.data_ptr(), v.data_ptr()
        s.rope_cos, s.rope_sin = self.cos.data_ptr(), self.sin.data_ptr()
        self.scratch = torch.empty(int(native.function("lowbit_decode_scratch")(ctypes.addressof(s))))
        self.logits = torch.empty(s.head.rows)

    # -- running -------------------------------------------------------------------------------------

    @property
    def engine_prefill(self) -> bool:
        """Whether :meth:`prefill` runs on the engine (``csrc/prefill.cpp``: every linear on the integer tile),
        else in torch."""
        return bool(native.function("lowbit_prefill_ok")(ctypes.addressof(self._struct)))

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor, threads: int | None = None) -> torch.Tensor:
        """Run the prompt ``ids`` (``(T,)`` or ``(1, T)`` int64) through the model, fill the cache's positions
        ``0..T-1``, and return the last position's logits ``(vocab,)`` float32: on the engine where
        :attr:`engine_prefill`, in chunks of :data:`PREFILL_CHUNK` tokens, else by the model in torch."""
        ids = ids.reshape(1, -1)
        t = ids.shape[1]
        if t < 1:
            raise InputError("the prompt has no tokens")
        self.reserve(t + 1)
        if self.engine_prefill:
            x = self.parts.embed(ids)[0].float().contiguous()
            fn = native.function("lowbit_prefill")
            for start in range(0, t, PREFILL_CHUNK):
                n = min(PREFILL_CHUNK, t - start)
                rc = fn(ctypes.addressof(self._struct), x[start].data_ptr(), start, n, self.logits.data_ptr(),
                        threads or self.threads)
                if rc:
                    raise RuntimeError(f"lowbit's prefill refused {n} tokens at {start} (code {rc})")
            return self.logits[:self.vocab].clone()
        out = self.model(input_ids=ids, use_cache=True)
        cache = out.past_key_values
        for i in range(len(self.parts.layers)):
            self.k_cache[i, :, :t] = cache.layers[i].keys[0].float()
            self.v_cache[i, :, :t] = cache.layers[i].values[0].float()
        return out.logits[0, -1].float()

    @torch.inference_mode()
    def step(self, token: int, pos: int, threads: int | None = None) -> torch.Tensor:
        """Logits ``(vocab,)`` (a view of a buffer the next step overwrites) of ``token`` at position ``pos``;
        positions ``0..pos-1`` must be in the cache (``prefill`` or earlier steps)."""
        if not 0 <= pos < self.max_len:
            self.reserve(max(2 * self.max_len, pos + 1))
        x = self._rows.get(token)
        if x is None:  # a quantized embedding's lookup costs tens of microseconds: rows seen are kept
            x = self.parts.embed(torch.tensor([token])).float().contiguous()
            if len(self._rows) < EMBEDDING_CACHE_ROWS:
                self._rows[token] = x
        rc = self._fn(ctypes.addressof(self._struct), x.data_ptr(), pos, self.logits.data_ptr(),
                      self.scratch.data_ptr(), threads or self.threads)
        if rc:
            raise RuntimeError(f"lowbit's decode step refused position {pos} (code {rc})")
        return self.logits[:self.vocab]

"""GGUF export of lowbit language models, in the block types llama.cpp reads.

lowbit formats that a GGML type represents are written as that type, with lowbit's own codes and scales (no
requantization); the layouts are in ``lowbit.export.gguf_blocks``:

    lowbit spec          GGML type   exact?
    int8-g32 (sym)       Q8_0        yes
    int4-g32 / int5-g32  Q4_0 / Q5_0  yes
    int4-g32-asym        Q4_1        the offset -zp * s rounded to fp16
    int5-g32-asym        Q5_1        likewise
    int2-g16-asym-sk4    Q2_K        yes (k-quants: rows a multiple of 256)
    int3-g16-sk6         Q3_K        yes
    int4-g32-asym-sk6    Q4_K        yes
    int5-g32-asym-sk6    Q5_K        yes
    int6-g16-sk8         Q6_K        yes

The k-quant specs are also named by their GGML names (``q4_k``, ``q6_k``...). Scales of the legacy types must be
stored as fp16 (lowbit's default for integers). Float tensors (norms, a float embedding) are written as F32.
Anything else stops with an :class:`InputError` naming the module and the reason: another format or group size,
a k-quant layer whose rows are not a multiple of 256 (llama.cpp's requirement; use Q5_0 / Q8_0 there, as
llama.cpp itself does), activation quantization, or AWQ's per-input-channel scales (GGUF has no place for
them; quantize with ``gptq`` or ``rtn`` for GGUF).

Architectures (:data:`ARCHITECTURES`): Llama (SmolLM2) and Mistral (written as llama.cpp's ``llama``, as its own
converter does), Qwen2 (with its q/k/v biases), Qwen3 (per-head q/k norms) and Gemma-3 (text; its norms stored
as ``1 + w``, the gain llama.cpp multiplies by), all with plain RoPE. The hyper-parameters are written from the
model's config. When the model came from a GGUF file (the bundled SmolLM2-135M and Gemma-3-270M, or a ``.gguf``
loaded by ``lowbit.load_model``), that file's other metadata (tokenizer, chat template, names) is copied, so
llama.cpp and transformers tokenize the export exactly as the source; without one the file has no tokenizer
(transformers loads its weights, llama.cpp refuses it). For Llama and Mistral the attention query and key rows
are permuted into llama.cpp's rotary layout, which both readers undo; the others use the rotate-half layout
transformers computes in.
"""

from __future__ import annotations

import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lowbit.atomic import atomic_file
from lowbit.export import gguf_blocks
from lowbit.export.checks import refuse, rotated_float_linears, weight_only_problem
from lowbit.errors import InputError
from lowbit.io.save import check_destination
from lowbit.nn import QuantEmbedding, QuantLinear
from lowbit.nn.base import QuantModule
from lowbit.spec import SUPER_BLOCK, QuantSpec

log = logging.getLogger(__name__)

# lowbit spec name -> GGML type
GGML_TYPES = {"int8-g32": "Q8_0", "int4-g32": "Q4_0", "int4-g32-asym": "Q4_1", "int5-g32": "Q5_0",
              "int5-g32-asym": "Q5_1", "int2-g16-asym-sk4": "Q2_K", "int3-g16-sk6": "Q3_K",
              "int4-g32-asym-sk6": "Q4_K", "int5-g32-asym-sk6": "Q5_K", "int6-g16-sk8": "Q6_K"}
# GGUF general.file_type (llama.cpp's LLAMA_FTYPE) for the most common type in the file
FILE_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q8_0": 7, "Q5_0": 8, "Q5_1": 9, "Q2_K": 10, "Q3_K": 12, "Q4_K": 15,
              "Q5_K": 17, "Q6_K": 18}
# copied from the source GGUF: everything but its layout, type and hyper-parameters (written from the config,
# under the architecture's prefix)
_SKIP_FIELDS = ("GGUF.", "general.architecture", "general.file_type", "general.quantization_version")
# Hugging Face model_type -> (GGUF architecture, whether q/k rows are permuted to llama.cpp's interleaved rotary)
ARCHITECTURES = {"llama": ("llama", True), "mistral": ("llama", True), "qwen2": ("qwen2", False),
                 "qwen3": ("qwen3", False), "gemma3_text": ("gemma3", False)}
# state tensors that are not weights of the file (recomputed by every reader)
_NOT_WEIGHTS = ("rotary_emb", "embed_scale")


def ggml_type(spec: QuantSpec) -> str | None:
    """The GGML type that stores ``spec`` (exactly, but for the fp16 offset of Q4_1 / Q5_1), or None."""
    return GGML_TYPES.get(spec.name)


def why_not_gguf(name: str, m: QuantModule) -> str | None:
    """Why module ``name`` cannot be written to GGUF, or None."""
    t = ggml_type(m.spec)
    if t is None:
        kinds = ", ".join(f"{s} -> {t}" for s, t in GGML_TYPES.items())
        return f"{name}: weight format {m.spec.name} has no GGML block type (supported: {kinds})"
    if m.spec.has_super_scale and m.weight_shape[-1] % SUPER_BLOCK:
        return (f"{name}: {t} needs rows of a multiple of {SUPER_BLOCK} weights, this layer's have "
                f"{m.weight_shape[-1]}; use int5-g32 (Q5_0) or int8-g32 (Q8_0) for it, as llama.cpp does")
    return weight_only_problem(name, m, "GGUF", "llama.cpp")


def export_gguf(model: nn.Module, source: dict[str, Any] | None, path: str | os.PathLike, *,
                overwrite: bool = False) -> Path:
    """Write ``model`` (a lowbit-quantized or float causal LM of one of :data:`ARCHITECTURES`) to the GGUF file
    ``path``.

    ``source``: the model's source dict (``LoadedModel.source`` or a saved artifact's manifest), which must
    lead to a GGUF file whose metadata is copied. The file is written beside ``path`` under a temporary
    name and renamed when complete, so a failure leaves no partial file. Returns the absolute path.
    """
    import gguf

    dest = check_destination(path, overwrite, file=True)
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise InputError(f"GGUF export supports the causal LMs with model_type {', '.join(ARCHITECTURES)}; "
                         + (f"this model's is {model_type!r}" if model_type is not None
                            else f"this {type(model).__name__} has no Hugging Face config"))
    arch, permute = ARCHITECTURES[model_type]
    src = source_gguf(source, required=False)
    refuse([why for n, m in model.named_modules() if isinstance(m, QuantModule)
            and (why := why_not_gguf(n, m)) is not None] + rotated_float_linears(model, "llama.cpp"), "GGUF")

    reader = gguf.GGUFReader(src) if src is not None else None
    if reader is None:
        log.warning("the model's source is not a GGUF file, so the export has no tokenizer: transformers can load "
                    "its weights, llama.cpp cannot run it")
    n_blocks = int(config.num_hidden_layers)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], n_blocks)
    tensors = list(_tensors(model, config, permute, gemma=arch == "gemma3"))
    skip = _SKIP_FIELDS
    if reader is not None:
        skip += (f"{reader.fields['general.architecture'].contents()}.",)
    with atomic_file(dest) as tmp:  # renamed to dest when complete; an OSError becomes an InputError
        w = gguf.GGUFWriter(tmp, arch)
        _write_hparams(w, config, arch)
        for key, field in (reader.fields.items() if reader is not None else ()):
            if key.startswith(skip):
                continue
            vtype = field.types[0]
            sub = field.types[1] if vtype == gguf.GGUFValueType.ARRAY and len(field.types) > 1 else None
            w.add_key_value(key, field.contents(), vtype, sub)
        w.add_file_type(_file_type(tensors))
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for hf_name, kind, data, shape in tensors:
            gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if gname is None:
                raise InputError(f"cannot export to GGUF: no llama.cpp tensor name for {hf_name!r}")
            if kind == "F32":
                w.add_tensor(gname, data)
            else:
                w.add_tensor(gname, data, raw_dtype=gguf.GGMLQuantizationType[kind])  # shape read from the block bytes
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    log.info("wrote %s (%d tensors, %.1f MB)", dest, len(tensors), dest.stat().st_size / 1e6)
    return dest


def _write_hparams(w: Any, config: Any, arch: str) -> None:
    """llama.cpp's ``ARCH.*`` hyper-parameters from the model's Hugging Face config."""
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    rope = getattr(config, "rope_parameters", None) or {}
    if isinstance(rope.get("full_attention"), dict):  # Gemma-3: one set per layer type; llama.cpp reads the global
        rope = rope["full_attention"]
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    if rope.get("rope_type", "default") not in ("default", None):
        raise InputError(f"GGUF export: rope scaling {rope.get('rope_type')!r} is not supported (plain RoPE only)")
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(heads)
    w.add_head_count_kv(int(config.num_key_value_heads))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    w.add_rope_freq_base(float(theta))
    w.add_vocab_size(int(config.vocab_size))
    if arch == "llama":
        w.add_rope_dimension_count(head_dim)
    if arch in ("qwen3", "gemma3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    if arch == "gemma3" and getattr(config, "sliding_window", None):
        w.add_sliding_window(int(config.sliding_window))


def source_gguf(source: dict[str, Any] | None, required: bool = True) -> Path | None:
    """The GGUF file a model source points to (bundled models with a GGUF, or a ``gguf`` source); None or an
    :class:`InputError` (``required``) for other sources."""
    from lowbit.models.registry import BUNDLED_MODELS

    if source is None:
        if not required:
            return None
        raise InputError("GGUF export needs the model's source (its GGUF file gives the tokenizer and metadata)")
    if source.get("type") == "gguf":
        p = Path(source["path"])
        if not p.is_file():
            raise InputError(f"the model's source GGUF {p} is missing")
        return p
    if source.get("type") == "bundled":
        entry = BUNDLED_MODELS.get(source.get("name"))
        if entry is not None and entry.gguf is not None:
            return entry.gguf()
    if not required:
        return None
    raise InputError(f"GGUF export needs a model loaded from a GGUF file (bundled smollm2-135m or a .gguf), "
                     f"for its tokenizer; this model's source is {source.get('type')!r}")


def _tensors(model: nn.Module, config: Any, permute: bool = True, gemma: bool = False):
    """(HF state name, GGML type or "F32", numpy data, logical shape (rows, cols)) for every tensor to write:
    q/k rows permuted to llama.cpp's rotary layout (``permute``), Gemma's norm gains ``1 + w`` (``gemma``)."""
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantEmbedding))}
    heads = {"q_proj": int(config.num_attention_heads), "k_proj": int(config.num_key_value_heads)} if permute else {}
    same_head = _head_repeats_embedding(model)
    for name, m in quantized.items():
        if same_head and m is model.lm_head:
            continue  # llama.cpp computes the output from token_embd when output.weight is absent
        rows = _rope_rows(name, m.weight_shape[0], heads)
        yield f"{name}.weight", ggml_type(m.spec), _blocks(m, rows), m.weight_shape
    seen: set[int] = set()
    tied_lm_head = _tied_lm_head(model)
    for key, t in model.state_dict(keep_vars=False).items():
        owner = key.rsplit(".", 1)[0]
        if (owner in quantized and not key.endswith(".bias")) or (tied_lm_head and key == "lm_head.weight"):
            continue  # a quantized layer's storage is written above (its bias, as F32, here)
        if any(part in key for part in _NOT_WEIGHTS) or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        arr = t.detach().float()
        if gemma and key.endswith("norm.weight"):
            arr = arr + 1.0  # Gemma's RMSNorm multiplies by 1 + w; llama.cpp by the stored gain
        rows = _rope_rows(owner, arr.shape[0], heads) if arr.dim() == 2 else None
        if rows is not None:
            arr = arr[rows]
        yield key, "F32", arr.contiguous().numpy(), tuple(arr.shape)


def _tied_lm_head(model: nn.Module) -> bool:
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return (isinstance(head, nn.Linear) and isinstance(emb, nn.Embedding)
            and head.weight.data_ptr() == emb.weight.data_ptr())


def _head_repeats_embedding(model: nn.Module) -> bool:
    """True when a quantized lm_head holds exactly the quantized embedding (a tied model quantized alike)."""
    head = getattr(model, "lm_head", None)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if not (isinstance(head, QuantLinear) and isinstance(emb, QuantEmbedding) and head.spec == emb.spec):
        return False
    if head.bias is not None or head.input_scale is not None or head.weight_shape != emb.weight_shape:
        return False
    names = ("qweight", "scale", "zero_point", "super_scale", "super_min")
    pairs = [(getattr(head, n), getattr(emb, n)) for n in names]
    return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b)) for a, b in pairs)


def _rope_rows(name: str, rows: int, heads: dict[str, int]) -> torch.Tensor | None:
    """llama.cpp's row order of a query/key projection: per head, the two rotary halves interleaved."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf not in heads:
        return None
    n = heads[leaf]
    return torch.arange(rows).reshape(n, 2, rows // n // 2).transpose(1, 2).reshape(-1)


def _blocks(m: QuantModule, rows: torch.Tensor | None) -> np.ndarray:
    """The module's weight as GGML blocks: uint8 ``(out, row bytes)``, rows in llama.cpp's order."""
    q = m.quantized_weight()
    if rows is not None:
        pick = {f: getattr(q, f)[rows] for f in ("codes", "scale", "zero_point", "super_scale", "super_min")
                if getattr(q, f) is not None}
        q = replace(q, **pick)
    return gguf_blocks.blocks(ggml_type(m.spec), q)


def _file_type(tensors) -> int:
    """GGUF ``general.file_type`` for the most common block type (llama.cpp's LLAMA_FTYPE numbering)."""
    counts: dict[str, int] = {}
    for _, kind, data, _ in tensors:
        if kind != "F32":
            counts[kind] = counts.get(kind, 0) + data.size
    if not counts:
        return 0  # ALL_F32
    return FILE_TYPES[max(counts, key=counts.get)]

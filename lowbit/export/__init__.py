"""Exports other runtimes load: GGUF (llama.cpp, transformers)."""

from lowbit.export.gguf import GGML_TYPES, export_gguf, ggml_type, why_not_gguf

__all__ = ["export_gguf", "ggml_type", "why_not_gguf", "GGML_TYPES"]

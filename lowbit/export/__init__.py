"""Exports other runtimes load: GGUF (llama.cpp, transformers; ``lowbit.export.gguf_mix`` for llama.cpp's type
mixes), compressed-tensors ``pack-quantized`` folders (transformers, vLLM; ``lowbit.export.compressed_tensors``) and
QDQ ONNX (onnxruntime).

``lowbit.export.onnx`` imports torch's ONNX exporter pieces on first use; import it (or call
:func:`export_onnx`) only when exporting.
"""

from lowbit.export.gguf import GGML_TYPES, export_gguf, ggml_type, why_not_gguf


def export_onnx(*args, **kwargs):
    """See :func:`lowbit.export.onnx.export_onnx`."""
    from lowbit.export.onnx import export_onnx as run

    return run(*args, **kwargs)


__all__ = ["export_gguf", "export_onnx", "ggml_type", "why_not_gguf", "GGML_TYPES"]

"""Loading models: bundled demo models, local Hugging Face folders, GGUF files, tiny test models.

    loaded = load_model("smollm2-135m")          # or "gemma3-270m", a folder, or "path/to/model.gguf"
    skeleton = build_skeleton(loaded.source)     # same architecture, weights not read
    default_bos(loaded)                          # does its perplexity protocol prepend BOS? (Gemma: yes)
"""

from lowbit.models.registry import (
    BUNDLED_MODELS,
    LoadedModel,
    build_skeleton,
    cache_dir,
    dataset_of,
    default_bos,
    gemma3_path,
    load_model,
    load_tokenizer,
    resolve_source,
    smollm2_path,
)
from lowbit.models.hf import is_tied
from lowbit.models.tiny import ByteTokenizer, tiny_cnn, tiny_gpt2, tiny_llama, tiny_opt

__all__ = [
    "BUNDLED_MODELS",
    "ByteTokenizer",
    "LoadedModel",
    "build_skeleton",
    "cache_dir",
    "dataset_of",
    "default_bos",
    "gemma3_path",
    "is_tied",
    "load_model",
    "load_tokenizer",
    "resolve_source",
    "smollm2_path",
    "tiny_cnn",
    "tiny_gpt2",
    "tiny_llama",
    "tiny_opt",
]

"""Hugging Face models from local files only: a model folder (config.json + weights) or a GGUF file.

Nothing here touches the network: every ``from_pretrained`` call passes ``local_files_only=True``.
GGUF weights are dequantized by transformers to fp32 (so the weights of a Q4_1 file stay on its
4-bit grid, see shared/ASSETS.md). ``transformers`` is imported lazily: it takes seconds.

The model class is the one ``config.architectures`` names, found in transformers' task mappings (the tables
its Auto classes read), which also give the model's *kind* (:data:`TASKS`): ``LlamaForCausalLM`` ->
"causal-lm", ``WhisperForConditionalGeneration`` -> "speech-seq2seq", ``BertModel`` -> "base-model", ... A
config without ``architectures`` (GGUF metadata, a hand-written config) gets the first task whose mapping
has its ``model_type``.

A model folder's own code (``auto_map`` in its config: a class that only the folder's Python files define) runs
only when asked: ``trust_remote_code=True`` in :func:`lowbit.load_model` / :func:`lowbit.load`, or
``--trust-remote-code`` on the command line, which set :func:`remote_code` for the call. Without it such a
folder is refused before any of its files is imported, with a message saying how to opt in. The folder's code
is used only for a class transformers itself does not have.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import functools
import json
import logging
import struct
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.nn.hf_classes import KINDS, TASKS, class_by_name, mapping_names, task_of_class, transformers_attr
__all__ = ["KINDS", "TASKS", "class_by_name", "task_of_class"]  # re-exported: the task table lives in lowbit.nn
from lowbit.nn.roles import output_embedding, tied_head

log = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"
WEIGHT_PATTERNS = ("*.safetensors",)
# pickled checkpoints: lowbit never unpickles (a pickle can run any code), so a folder holding only these is refused
PICKLE_PATTERNS = ("pytorch_model*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")
# errors transformers/gguf raise on unreadable or inconsistent files; re-raised as InputError
_LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError, EOFError, IndexError, struct.error)
# config.model_type of architectures trained with a BOS token at position 0 of every sequence (Gemma's
# tokenizers add it; without it the first positions are off-distribution and perplexity inflates):
# their default perplexity protocol prepends BOS. Every other model is evaluated without it.
BOS_MODEL_TYPES = frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"})


_TRUST_REMOTE_CODE: contextvars.ContextVar[bool] = contextvars.ContextVar("lowbit_trust_remote_code", default=False)


@contextlib.contextmanager
def remote_code(trusted: bool):
    """Within this block, a model folder's own code (its config's ``auto_map``) may run when ``trusted``."""
    token = _TRUST_REMOTE_CODE.set(bool(trusted))
    try:
        yield
    finally:
        _TRUST_REMOTE_CODE.reset(token)


def remote_code_trusted() -> bool:
    """True inside ``remote_code(True)``."""
    return _TRUST_REMOTE_CODE.get()


def uses_remote_code(config: Any) -> bool:
    """True if ``config`` (a folder's, read with its code trusted) names a class only the folder's code defines."""
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    if any(task_of_class(a) is not None for a in archs):
        return False
    model_type = getattr(config, "model_type", None)
    if not archs and any(model_type in mapping_names(m) for _, m, _ in TASKS):
        return False
    return bool(getattr(config, "auto_map", None))


def load_hf_folder(path: Path) -> tuple[nn.Module, str, Any]:
    """(model, kind, tokenizer or None) from a local Hugging Face model folder, fp32, eval mode."""
    config = folder_config(path)
    kind, cls = model_class(config, path)
    from lowbit.io.compressed_tensors import is_compressed_tensors

    if is_compressed_tensors(config.to_dict()):  # already quantized (pack-quantized): lowbit's own layers
        from lowbit.io.compressed_tensors import read_compressed_tensors

        return read_compressed_tensors(path, config, cls), kind, _optional_tokenizer(path, gguf_file=None)
    extra = {"trust_remote_code": True} if remote_code_trusted() and uses_remote_code(config) else {}
    model = _read(
        lambda: cls.from_pretrained(path, dtype=torch.float32, local_files_only=True, use_safetensors=True, **extra),
        path, "weights"
    )
    return model.float().eval(), kind, _optional_tokenizer(path, gguf_file=None)


def load_gguf(path: Path) -> tuple[nn.Module, str, Any]:
    """(model, kind, tokenizer) from a ``.gguf`` file, dequantized to fp32, eval mode."""
    check_gguf(path)
    from transformers import AutoModelForCausalLM

    model = _read(  # every architecture transformers reads from GGUF is a causal LM
        lambda: AutoModelForCausalLM.from_pretrained(
            path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True, **_dequantize_gguf()
        ),
        path, "GGUF tensors",
    )
    _check_dense(model, path)
    tokenizer = _optional_tokenizer(path.parent, gguf_file=path.name)
    return model.float().eval(), "causal-lm", tokenizer


def folder_config(path: Path) -> Any:
    """The transformers config of a local Hugging Face model folder (checked first).

    A config class defined by the folder's own code is read only inside ``remote_code(True)``; otherwise
    InputError, before any of the folder's files is imported (transformers would ask on the terminal)."""
    check_hf_folder(path)
    raw = json.loads((path / "config.json").read_text(encoding="utf-8"))
    auto_map = raw.get("auto_map") if isinstance(raw, dict) and isinstance(raw.get("auto_map"), dict) else {}
    remote = "AutoConfig" in auto_map and not _known_model_type(raw.get("model_type"))
    if remote and not remote_code_trusted():
        raise InputError(_remote_code_message(path, f"model_type {raw.get('model_type')!r}", auto_map))
    extra = {"trust_remote_code": True} if remote else {}
    return _read(lambda: _auto_config().from_pretrained(path, local_files_only=True, **extra), path, "config.json")


def _known_model_type(model_type: Any) -> bool:
    from transformers import CONFIG_MAPPING

    return isinstance(model_type, str) and model_type in CONFIG_MAPPING


def _remote_code_message(where: Any, named: str, auto_map: Any) -> str:
    return (f"{where}: {named} is defined by the folder's own code (auto_map {sorted(auto_map)}), which lowbit runs "
            f"only when asked: pass --trust-remote-code (Python: trust_remote_code=True to lowbit.load_model and "
            f"lowbit.load) where you trust that code, or load the model yourself and pass the module to "
            f"lowbit.quantize() and lowbit.load(path, model=...)")


def gguf_config(path: Path) -> Any:
    """The transformers config stored in a GGUF file's metadata (a fresh copy each call).

    Reading it parses the whole metadata block, tokenizer vocabulary included (seconds for SmolLM2), and
    ``lowbit.load`` needs it twice (the architecture on ``meta`` to check the artifact, then for real), so
    the parsed config is kept per file identity (path, size, modification time).
    """
    check_gguf(path)
    st = path.stat()
    return copy.deepcopy(_gguf_config(str(path.resolve()), st.st_size, st.st_mtime_ns))


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, size: int, mtime_ns: int) -> Any:
    p = Path(path)
    return _read(lambda: _auto_config().from_pretrained(p.parent, gguf_file=p.name, local_files_only=True),
                 p, "GGUF metadata")


def skeleton_from_config(config: Any, where: str) -> nn.Module:
    """An fp32, eval-mode model of the architecture in ``config`` (a transformers config or its
    ``to_dict()``), randomly initialised: no weight file is read."""
    if isinstance(config, dict):
        config = config_from_dict(config, where)
    _, cls = model_class(config, where)
    return build_from_config(cls, config)


def build_from_config(cls: Any, config: Any) -> nn.Module:
    """A randomly initialised fp32 eval-mode ``cls`` (a transformers model or Auto class) for ``config``."""
    with torch.random.fork_rng(devices=[]):  # from_config draws random init from the global RNG
        if hasattr(cls, "from_config"):  # an Auto class
            extra = {"trust_remote_code": True} if remote_code_trusted() and uses_remote_code(config) else {}
            model = cls.from_config(config, dtype=torch.float32, **extra)
        else:
            model = cls._from_config(config, dtype=torch.float32)
    return model.float().eval()


def config_from_dict(config: dict[str, Any], where: str) -> Any:
    """A transformers config from ``config.to_dict()`` output (as stored in a model source)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type not in CONFIG_MAPPING:
        raise InputError(f"{where}: config has unknown model_type {model_type!r}; expected a transformers type")
    return CONFIG_MAPPING[model_type].from_dict(config)


def load_tokenizer(path: Path, gguf_file: str | None = None) -> Any:
    """The tokenizer of a local folder (or of a GGUF file inside it), or None if there is none."""
    return _optional_tokenizer(path, gguf_file)


def model_class(config: Any, where: Path | str) -> tuple[str, Any]:
    """(kind, transformers model class) for a config: the class ``config.architectures`` names (the first one
    transformers' task mappings know), or without ``architectures`` the Auto class of the first task in
    :data:`TASKS` whose mapping has the config's ``model_type``. InputError naming the class otherwise."""
    archs = [a for a in (getattr(config, "architectures", None) or []) if isinstance(a, str)]
    model_type = getattr(config, "model_type", None)
    for arch in archs:
        kind = task_of_class(arch)
        if kind is not None:
            return kind, transformers_attr(arch)
    if not archs:
        for kind, mapping, auto in TASKS:
            if model_type in mapping_names(mapping):
                return kind, transformers_attr(auto)
    remote = getattr(config, "auto_map", None)
    named = f"architectures {archs}" if archs else f"model_type {model_type!r}"
    if remote:
        if not remote_code_trusted():
            raise InputError(_remote_code_message(where, named, remote))
        for kind, _, auto in TASKS:  # the first task whose Auto class the folder's code registers
            if auto in remote:
                return kind, transformers_attr(auto)
        raise InputError(f"{where}: {named}: the folder's code registers {sorted(remote)}, none of them an Auto class "
                         f"of a task lowbit loads ({', '.join(a for _, _, a in TASKS)})")
    raise InputError(
        f"{where}: {named} is no model class lowbit can build: transformers has no task ({', '.join(KINDS)}) "
        f"with it; load the model yourself and pass the module to lowbit.quantize() (and "
        f"lowbit.load(path, model=...))"
    )


def check_hf_folder(path: Path) -> None:
    """Raise InputError unless ``path`` is a folder with config.json and weight files."""
    if not path.is_dir():
        raise InputError(f"{path}: not a folder; expected a Hugging Face model folder (config.json + weights)")
    config = path / "config.json"
    if not config.is_file():
        raise InputError(f"{path}: no config.json; expected a Hugging Face model folder (config.json + weights)")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InputError(f"{config}: not valid JSON ({err}); expected a Hugging Face config.json") from err
    if not any(next(path.glob(p), None) for p in WEIGHT_PATTERNS):
        pickled = sorted(f.name for p in PICKLE_PATTERNS for f in path.glob(p))
        if pickled:
            raise InputError(f"{path}: its weights are pickled ({', '.join(pickled[:3])}); lowbit never unpickles "
                             f"(a pickle can run code). Convert them to safetensors (model.save_pretrained(folder, "
                             f"safe_serialization=True) where you trust the file)")
        raise InputError(f"{path}: has config.json but no weights; expected {', '.join(WEIGHT_PATTERNS)} files")


def check_gguf(path: Path) -> None:
    """Raise InputError unless ``path`` is a readable file starting with the GGUF magic bytes."""
    if not path.is_file():
        raise InputError(f"{path}: no such file; expected a .gguf model file")
    with path.open("rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise InputError(f"{path}: starts with {magic!r}, not {GGUF_MAGIC!r}; not a GGUF file (corrupt or wrong file?)")


def needs_bos(model: nn.Module) -> bool:
    """True if ``model``'s config names an architecture in :data:`BOS_MODEL_TYPES` (False without a config)."""
    return getattr(getattr(model, "config", None), "model_type", None) in BOS_MODEL_TYPES


def has_head(model: nn.Module) -> bool:
    """True if ``model`` has an output head (see ``lowbit.nn.roles``)."""
    return output_embedding(model) is not None


def is_tied(model: nn.Module) -> bool:
    """True if the output head shares its weight tensor with the input embedding."""
    return tied_head(model)


# ---------------------------------------------------------------------------------------------
# helpers


def _auto_config() -> Any:
    from transformers import AutoConfig

    return AutoConfig


def _dequantize_gguf() -> dict[str, Any]:
    """transformers 5 may keep GGUF weights packed (``GgufLinear``) when a matmul kernel is installed;
    ask for plain dense fp32 weights. Without this option, a model loaded from GGUF also reports
    ``is_quantized=True``, which makes ``.float()``, ``.to(dtype)`` and ``save_pretrained`` refuse."""
    try:
        from transformers import GgufConfig
    except ImportError:  # transformers 4.x: GGUF is always dequantized
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _check_dense(model: nn.Module, path: Path) -> None:
    """Fail loudly if transformers left GGUF-packed modules or a quantizer on the model."""
    packed = sorted({type(m).__name__ for m in model.modules() if type(m).__name__.lower().startswith("gguf")})
    if packed or getattr(model, "is_quantized", False):
        raise InputError(
            f"{path}: transformers did not dequantize this GGUF (modules {packed}, is_quantized="
            f"{getattr(model, 'is_quantized', None)}); lowbit needs dense fp32 weights: upgrade or pin transformers"
        )


def _read(load: Any, path: Path, what: str) -> Any:
    """Call a transformers loader; its file errors become an InputError naming the path."""
    try:
        return load()
    except InputError:
        raise
    except _LOAD_ERRORS as err:
        raise InputError(f"{path}: could not read {what} ({type(err).__name__}: {err}); "
                         f"is the file complete and a model transformers supports?") from err


def stored_float_dtype(folder: str | Path) -> str | None:
    """``"float16"`` or ``"bfloat16"`` when every floating tensor of a Hugging Face folder's safetensors weights
    is stored in it (read from the file headers alone), else None (float32, a mix, or no safetensors file)."""
    import json as _json

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    found: set[str] = set()
    for f in files:
        try:
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                if n > 100 * 2**20:
                    return None
                header = _json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            return None
        found |= {v.get("dtype") for k, v in header.items() if k != "__metadata__" and isinstance(v, dict)
                  and v.get("dtype") in ("F16", "BF16", "F32", "F64")}
    if found == {"F16"}:
        return "float16"
    if found == {"BF16"}:
        return "bfloat16"
    return None


def load_feature_extractor(folder: str | Path) -> Any:
    """The feature extractor of a local folder (``preprocessor_config.json``: what turns audio or images into a
    model's inputs), or None if there is none."""
    from transformers import AutoFeatureExtractor

    folder = Path(folder)
    if not (folder / "preprocessor_config.json").is_file():
        log.info("%s: no preprocessor_config.json; feature extractor is None", folder)
        return None
    try:
        return AutoFeatureExtractor.from_pretrained(folder, local_files_only=True)
    except _LOAD_ERRORS as err:
        raise InputError(f"{folder}: could not read the feature extractor ({type(err).__name__}: {err})") from err


def load_processor(folder: str | Path) -> Any:
    """The processor of a local folder (``processor_config.json`` or ``preprocessor_config.json`` with the
    tokenizer: what turns an image and a prompt into a vision-language model's inputs), or None if there is none."""
    from transformers import AutoProcessor

    folder = Path(folder)
    if not any((folder / n).is_file() for n in ("processor_config.json", "preprocessor_config.json")):
        log.info("%s: no processor_config.json or preprocessor_config.json; processor is None", folder)
        return None
    extra = {"trust_remote_code": True} if remote_code_trusted() else {}
    try:
        return AutoProcessor.from_pretrained(folder, local_files_only=True, **extra)
    except _LOAD_ERRORS as err:
        raise InputError(f"{folder}: could not read the processor ({type(err).__name__}: {err})") from err


def _optional_tokenizer(folder: Path, gguf_file: str | None) -> Any:
    from transformers import AutoTokenizer

    if gguf_file is None and not any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer_config.json",
                                                                       "tokenizer.model", "vocab.json")):
        log.info("%s: no tokenizer files; tokenizer is None", folder)
        return None
    kwargs = {"gguf_file": gguf_file} if gguf_file else {}
    if remote_code_trusted():
        kwargs["trust_remote_code"] = True
    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True, **kwargs)
    except _LOAD_ERRORS as err:
        where = folder / gguf_file if gguf_file else folder
        raise InputError(f"{where}: could not read the tokenizer ({type(err).__name__}: {err})") from err

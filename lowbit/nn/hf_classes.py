"""transformers model classes by task, without importing transformers until asked.

:data:`TASKS` lists the tasks lowbit loads, each with the transformers mapping its Auto class reads (class
names per ``model_type``); the mapping that holds a class name gives the model's *kind*. A transformers model
of a class found there can be rebuilt from its class name and config alone (:func:`source_of`), which is how
an artifact of a model handed to ``lowbit.quantize`` records its source.
"""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from lowbit.errors import InputError

# (kind, transformers task mapping, its Auto class), in the order a config without `architectures` is tried
TASKS = (
    ("causal-lm", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES", "AutoModelForCausalLM"),
    ("seq2seq-lm", "MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES", "AutoModelForSeq2SeqLM"),
    ("speech-seq2seq", "MODEL_FOR_SPEECH_SEQ_2_SEQ_MAPPING_NAMES", "AutoModelForSpeechSeq2Seq"),
    ("image-text-to-text", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES", "AutoModelForImageTextToText"),
    ("masked-lm", "MODEL_FOR_MASKED_LM_MAPPING_NAMES", "AutoModelForMaskedLM"),
    ("sequence-classifier", "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForSequenceClassification"),
    ("image-classifier", "MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES", "AutoModelForImageClassification"),
    ("base-model", "MODEL_MAPPING_NAMES", "AutoModel"),
)
KINDS = tuple(k for k, _, _ in TASKS)


def task_of_class(name: str) -> str | None:
    """The kind (:data:`TASKS`) of the transformers model class called ``name``, or None if it has none."""
    for kind, mapping, _ in TASKS:
        if name in _class_names(mapping):
            return kind
    return None


def class_by_name(name: str, where: str) -> tuple[str, Any]:
    """(kind, class) for a transformers model class name recorded in a source (never code from elsewhere)."""
    kind = task_of_class(name)
    if kind is None:
        raise InputError(f"{where}: {name!r} is no transformers model class lowbit can build (none of the tasks "
                         f"{', '.join(KINDS)}); pass model= to lowbit.load")
    return kind, transformers_attr(name)


def hf_class_name(model: nn.Module) -> str | None:
    """The name of ``model``'s class if it is a transformers model class lowbit can rebuild by name, else None
    (a subclass defined elsewhere, remote code, a plain ``nn.Module``)."""
    name = type(model).__name__
    if not type(model).__module__.startswith("transformers.") or task_of_class(name) is None:
        return None
    try:
        cls = transformers_attr(name)
    except InputError:
        return None
    return name if cls is type(model) else None


def mapping_names(name: str) -> Any:
    from transformers.models.auto import modeling_auto

    return getattr(modeling_auto, name, {})


@functools.lru_cache(maxsize=None)
def _class_names(mapping: str) -> frozenset[str]:
    names: set[str] = set()
    for v in mapping_names(mapping).values():
        names.update([v] if isinstance(v, str) else v)
    return frozenset(names)


def transformers_attr(name: str) -> Any:
    import transformers

    try:
        return getattr(transformers, name)
    except (AttributeError, ImportError) as err:  # a class its optional dependencies do not import
        raise InputError(f"transformers {transformers.__version__} cannot import {name} ({err})") from err


def source_of(model: nn.Module) -> dict[str, Any] | None:
    """The ``hf-config`` model source of a transformers model of a class lowbit can rebuild by name (its class
    name and ``config.to_dict()``), else None: a plain ``nn.Module`` records no source (loading its artifact
    needs ``model=``)."""
    name = hf_class_name(model)
    config = getattr(model, "config", None)
    if name is None or not hasattr(config, "to_dict"):
        return None
    return {"type": "hf-config", "class": name, "config": config.to_dict()}

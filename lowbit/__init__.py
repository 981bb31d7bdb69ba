"""lowbit: make trained neural networks small and fast by quantization.

The public verbs::

    import lowbit
    lm = lowbit.load_model("smollm2-135m")
    lowbit.quantize(lm.model, lowbit.QuantPlan.uniform("int4-g128-asym"))
    lowbit.save(lm.model, "out/smollm2-w4", source=lm.source)
    model = lowbit.load("out/smollm2-w4")

Names are imported on first use, so ``import lowbit`` stays cheap and importing one part (say
``lowbit.formats``) does not pull in model loaders or transformers.
"""

from __future__ import annotations

import importlib

from lowbit.version import __version__

_EXPORTS = {
    "quantize": "lowbit.quantizer",
    "save": "lowbit.io",
    "load": "lowbit.io",
    "load_model": "lowbit.models",
    "QuantSpec": "lowbit.spec",
    "ActivationQuant": "lowbit.spec",
    "PRESETS": "lowbit.spec",
    "QuantPlan": "lowbit.plan",
    "Rule": "lowbit.plan",
    "LowbitError": "lowbit.errors",
    "InputError": "lowbit.errors",
    "CorruptFileError": "lowbit.errors",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lowbit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)

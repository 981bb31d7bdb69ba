"""Saving and loading quantized models: a folder of safetensors + a JSON manifest, written atomically.

    path = lowbit.save(model, "out/model-w4", source=lm.source, plan=plan)
    model = lowbit.load("out/model-w4")          # or lowbit.load(path, model=float_model)
    manifest = read_manifest("out/model-w4")     # for tools: layers, sizes, source, plan

Never pickles: tensors go through safetensors, everything else is JSON.
"""

from lowbit.io.load import load
from lowbit.io.manifest import FORMAT, FORMAT_VERSION, MANIFEST, WEIGHTS, artifact_size, read_manifest
from lowbit.io.save import check_destination, save

__all__ = ["save", "load", "artifact_size", "check_destination", "read_manifest", "FORMAT", "FORMAT_VERSION", "MANIFEST", "WEIGHTS"]

"""Each stage of lowbit imports only the stages before it (``shared/DESIGN.md``: the data flow is the architecture).

    formats -> observers -> algorithms -> nn -> calibration -> quantizer -> io -> models/data -> evaluation,
    kernels, export, mixed (mixed precision: it measures and quantizes; only its latency table runs the kernels)

(plus leaf modules any stage may use: ``errors``, ``version``, ``spec``, ``atomic``, ``paths``, ``memory``,
``hadamard``, ``quiet`` (native libraries' prints silenced), ``cpu_features``, ``native``: the C++ library's build
and loading, whose functions serve the kernels and GPTQ's column loop).
Each case imports one module in a fresh interpreter and lists the lowbit packages that came with it.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

LATER = {  # module: the later stages it must not import
    "lowbit.formats": set("observers algorithms nn calibration quantizer targets io models data evaluation kernels export".split()),
    "lowbit.observers": set("algorithms nn calibration quantizer targets io models data evaluation kernels export".split()),
    "lowbit.algorithms": set("nn calibration quantizer targets io models data evaluation kernels export".split()),
    "lowbit.nn": set("algorithms calibration quantizer targets io models data evaluation kernels export".split()),
    "lowbit.calibration.sequential": set("quantizer targets io models data evaluation kernels export".split()),
    "lowbit.calibration.checkpoint": set("quantizer targets io models data evaluation kernels export".split()),
    "lowbit.transforms": set("quantizer targets io data evaluation kernels export".split()),
    "lowbit.targets": set("calibration quantizer io models data evaluation kernels export".split()),
    "lowbit.quantizer": set("io models data evaluation kernels export".split()),
    "lowbit.io": set("calibration quantizer targets models data evaluation kernels export".split()),
    "lowbit.models": set("calibration quantizer targets io data evaluation kernels export".split()),
    "lowbit.kernels": set("calibration quantizer targets io models data evaluation export".split()),
    "lowbit.runtime.generate": set("calibration quantizer targets io models data evaluation export".split()),
    "lowbit.mixed": set("kernels export runtime".split()),  # lowbit.mixed.latency imports kernels when it times
    "lowbit.native": set("formats observers algorithms nn calibration quantizer targets io models data evaluation "
                         "kernels export".split()),
    "lowbit.runtime.native_lm": set("calibration quantizer targets io models data evaluation export".split()),
}


@pytest.mark.parametrize("module", sorted(LATER))
def test_a_stage_imports_no_later_stage(module):
    code = ("import importlib, json, sys; importlib.import_module(sys.argv[1]); "
            "print(json.dumps(sorted({m.split('.')[1] for m in sys.modules if m.startswith('lowbit.')})))")
    out = subprocess.run([sys.executable, "-c", code, module], capture_output=True, text=True, check=True)
    loaded = set(json.loads(out.stdout.strip().splitlines()[-1]))
    assert module.split(".")[1] in loaded  # the check sees what it imports
    assert not loaded & LATER[module], f"{module} imports {sorted(loaded & LATER[module])}"

"""Speed and memory of lowbit's quantized models against float, on this machine, in one run.

    python benchmarks/speed.py [--sections matmul decode engines vision] [--json out.json]

Prints every table of ``lowbit bench`` (matrix products per format and shape at batch 1, 16 and 128; SmolLM2-135M
prefill, decode tokens/s, weight bytes and resident memory per format; the decode engines against llama.cpp,
quiet and with a busy core; EfficientNet-Lite0 images/s), then, with the matmul section, one more: the same 4-bit and 8-bit layers through lowbit's reference path (dequantize, then a float matrix
product: what "simulated" quantization costs) next to their kernels, so the kernels' share is visible.
"""

from __future__ import annotations

import argparse
import json

import torch

from lowbit.bench import SECTIONS, run_bench
from lowbit.evaluation.speed import matmul_layer, median_time


def reference_vs_kernel(shape=(4096, 4096), batches=(1, 128)) -> None:
    from lowbit.formats import quantize as quantize_tensor
    from lowbit.nn import QuantLinear
    from lowbit.spec import ActivationQuant, QuantSpec

    k, n = shape
    print(f"\n## {k}x{n}: lowbit reference path (dequantize + float matmul) vs kernel, median ms")
    print(f"{'format':>10} {'batch':>5} {'fp32':>9} {'reference':>10} {'kernel':>9} {'kernel vs reference':>20}")
    fp32, _, _ = matmul_layer("fp32", k, n)
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(0)) / k**0.5
    for fmt, spec, act in (("int4-g128", "int4-g128-asym", None), ("int8", "int8", None),
                           ("w8a8", "int8", "int8-token"), ("w4a8", "int4-g128-asym", "int8-token")):
        a = None if act is None else ActivationQuant(QuantSpec.parse(act), dynamic=True)
        ref = QuantLinear.from_float(w, None, quantize_tensor(w, QuantSpec.parse(spec)), a)
        fast, dtype, _ = matmul_layer(fmt, k, n)
        for b in batches:
            x = torch.randn(b, k, generator=torch.Generator().manual_seed(b))
            with torch.inference_mode():
                t32 = median_time(lambda: fp32(x))
                tr = median_time(lambda: ref.reference(x))
                tk = median_time(lambda: fast(x.to(dtype)))
            print(f"{fmt:>10} {b:5d} {1000 * t32:9.3f} {1000 * tr:10.3f} {1000 * tk:9.3f} {tr / tk:19.1f}x")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write every number of the lowbit bench tables here")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    out = run_bench(tuple(a.sections))
    if "matmul" in a.sections:
        reference_vs_kernel()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()

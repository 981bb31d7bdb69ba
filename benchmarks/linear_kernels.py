"""Each CPU kernel of a quantized linear layer against fp32, per shape and number of rows, in one run.

    python benchmarks/linear_kernels.py [--threads 2] [--rows 1 4 16 64 512] [--shapes small|llm|all] [--json F]

What a model hands a layer is float32 activations, so every variant here takes the same float32 input ``x``
``(rows, in)`` and returns float32: a kernel that computes in another precision pays its conversions, as it
does inside a model. Variants:

    fp32           nn.Linear (the baseline)
    int4-bf16      4-bit g128 weights, torch's int4 CPU matmul (bf16 activations)   kernel int4-weight-bf16
    int4-f32       4-bit g128 weights, lowbit's AVX2 kernel in float32              kernel int4-weight-avx2
    w4a8           4-bit g128 weights x dynamic per-token int8 activations          kernel w4a8-avx2
    int8-bf16      8-bit per-channel weights, torch's int8 CPU matmul              kernel int8-weight-bf16
    int8-f32       8-bit per-channel weights, lowbit's AVX2 kernel in float32       kernel int8-weight-avx2
    w8a8           8-bit per-channel weights x dynamic per-token int8 activations   first W8A8 kernel that fits

Beyond a few rows lowbit's kernels switch to the weight dequantized to float32 and torch's float product
(``DEQUANT_ROWS`` in each kernel's module). ``--dequant-rows N`` sets that switch for every kernel for this run
(a large N shows each kernel's own product at every row count): how the defaults were chosen.

Shapes: ``small`` are the layers of small models (Whisper-tiny 384 / 1536, T5-small 512 / 2048, SmolLM2-135M
576 / 1536), ``llm`` those of 7B-class models (4096 / 11008). Rows: 1 is one decode step; more rows are a
prompt, a batch or an encoder's frames. Each (shape, rows) cell times every variant in turn, ``--rounds``
rounds, and reports the median of the round medians, in microseconds and as speed relative to fp32 (above 1
is faster). Check that the machine is otherwise idle (the load average is printed).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

import torch
from torch import nn

from lowbit.bench import machine_line
from lowbit.evaluation.speed import median_time

SHAPES = {
    "small": ((384, 384), (384, 1536), (1536, 384), (512, 512), (512, 2048), (2048, 512), (576, 1536)),
    "llm": ((4096, 4096), (4096, 11008), (11008, 4096)),
}
# name -> (weight spec, dynamic activation spec, kernel name or None for the dispatch's first choice)
VARIANTS = {
    "int4-bf16": ("int4-g128-asym", None, "int4-weight-bf16"),
    "int4-f32": ("int4-g128-asym", None, "int4-weight-avx2"),
    "w4a8": ("int4-g128-asym", "int8-token", "w4a8-avx2"),
    "int8-bf16": ("int8", None, "int8-weight-bf16"),
    "int8-f32": ("int8", None, "int8-weight-avx2"),
    "w8a8": ("int8", "int8-token", None),
}


def layer(name: str, k: int, n: int) -> nn.Module:
    from lowbit.formats import quantize as quantize_tensor
    from lowbit.kernels import KERNELS, kernel_name, use_kernels
    from lowbit.nn import QuantLinear
    from lowbit.spec import ActivationQuant, QuantSpec

    g = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=g) / k**0.5
    bias = torch.randn(n, generator=g) / 10
    if name == "fp32":
        lin = nn.Linear(k, n).requires_grad_(False)
        lin.weight.copy_(w)
        lin.bias.copy_(bias)
        return lin
    wspec, aspec, kernel = VARIANTS[name]
    act = None if aspec is None else ActivationQuant(QuantSpec.parse(aspec), dynamic=True)
    m = QuantLinear.from_float(w, bias, quantize_tensor(w, QuantSpec.parse(wspec)), act)
    kernels = tuple(kn for kn in KERNELS if kernel is None or kn.name == kernel)
    use_kernels(m, kernels, keep_reference=False)
    if kernel_name(m) is None:
        raise SystemExit(f"{name}: no kernel runs it here ({kernel or 'any'})")
    return m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    p.add_argument("--shapes", choices=("small", "llm", "all"), default="small")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--min-time", type=float, default=0.2, help="seconds per variant per round")
    p.add_argument("--json", default=None)
    p.add_argument("--dequant-rows", type=int, default=None,
                   help="rows beyond which every kernel takes the float32 weight (default: each kernel's own)")
    a = p.parse_args()
    if a.dequant_rows is not None:
        from lowbit.kernels import int4_avx2, int8, int8_avx2

        for mod in (int4_avx2, int8, int8_avx2):
            mod.DEQUANT_ROWS = a.dequant_rows
        print(f"# --dequant-rows {a.dequant_rows}: every kernel's own product up to that many rows")
    torch.set_num_threads(a.threads)
    print(machine_line())
    print(f"# load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    shapes = SHAPES["small"] + SHAPES["llm"] if a.shapes == "all" else SHAPES[a.shapes]
    names = ["fp32", *a.variants]
    print(f"{'in x out':>12} {'rows':>5} " + " ".join(f"{n:>17}" for n in names))
    rows_out = []
    for k, n in shapes:
        layers = {name: layer(name, k, n) for name in names}
        for m in a.rows:
            x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
            per = {name: [] for name in names}
            with torch.inference_mode():
                for _ in range(a.rounds):
                    for name, lay in layers.items():
                        per[name].append(median_time(lambda: lay(x), min_time=a.min_time))
            med = {name: statistics.median(ts) for name, ts in per.items()}
            cells = [f"{1e6 * med['fp32']:10.0f}us     "] + [
                f"{1e6 * med[nm]:8.0f}us {med['fp32'] / med[nm]:5.2f}x" for nm in a.variants]
            print(f"{k:>5}x{n:<6} {m:5d} " + " ".join(cells), flush=True)
            rows_out.append({"in": k, "out": n, "rows": m, "seconds": med})
    print(f"# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine_line(), "threads": a.threads, "rows": rows_out}, f, indent=1)


if __name__ == "__main__":
    main()

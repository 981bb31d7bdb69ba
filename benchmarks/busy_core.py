"""What lowbit's kernels do when another process keeps a core busy, and which thread count to choose.

    python benchmarks/busy_core.py [--formats fp32 int4 w4a8] [--new-tokens 64]

On a 2-core machine, for 1 and 2 threads (``torch.set_num_threads``, which lowbit's C++ kernels follow too),
first with nothing else running, then with one spinning shell loop (``while :; do :; done``) beside it:
the 4096x4096 product at batch 1 and 128 for fp32 and the integer kernels, and SmolLM2-135M greedy decode
(batch 1) for ``--formats``, each saved once and loaded in a fresh process per measurement. Every row of a
condition is measured in that condition; ratios are against fp32 of the same condition.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from lowbit.bench import LM_FORMATS, decode_in_fresh_process, machine_line, save_lm_formats
from lowbit.bench_engines import busy_core
from lowbit.evaluation.speed import matmul_times

MATMUL = ("fp32", "int4-g128", "w8a8", "w4a8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", nargs="+", default=["fp32", "int4", "w4a8"], choices=list(LM_FORMATS))
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--model", default="smollm2-135m")
    a = p.parse_args()
    formats = ["fp32", *[f for f in a.formats if f != "fp32"]]
    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="lowbit-busy-"))
    try:
        jobs = save_lm_formats(a.model, formats, work)
        print(f"{'other load':>10} {'threads':>7} {'measure':>14} " + " ".join(f"{f:>10}" for f in MATMUL))
        decode_rows = []
        for busy in (False, True):
            load = "1 busy core" if busy else "none"
            for threads in (1, 2):
                torch.set_num_threads(threads)
                with busy_core(busy):
                    for r in matmul_times(4096, 4096, (1, 128), MATMUL, min_time=0.6):
                        print(f"{load:>10} {threads:7d} {'ms, batch ' + str(r.batch):>14} "
                              + " ".join(f"{1000 * r.seconds[f]:10.2f}" for f in MATMUL), flush=True)
                    rates = {name: decode_in_fresh_process(folder, dtype, 128, a.new_tokens)["decode_tokens_per_s"]
                             for name, _, folder, dtype in jobs}
                decode_rows.append((load, threads, rates))
        print(f"\n{a.model} decode tokens/s (batch 1, greedy, {a.new_tokens} new tokens after 128)")
        print(f"{'other load':>10} {'threads':>7} " + " ".join(f"{f:>14}" for f in formats))
        for load, threads, rates in decode_rows:
            print(f"{load:>10} {threads:7d} " + " ".join(
                f"{rates[f]:7.1f} ({rates[f] / rates['fp32']:4.2f}x)" for f in formats))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

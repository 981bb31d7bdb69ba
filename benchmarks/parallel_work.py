"""Where lowbit's C++ kernels start using several threads: SmolLM2-135M decode for each threshold, in one run.

    python benchmarks/parallel_work.py [--works 0 65536 262144 1048576] [--formats int4 w4a8] [--rounds 3]

A call of lowbit's kernels below ``work`` multiply-adds runs on the calling thread alone
(``lowbit.native.set_parallel_work``). SmolLM2's layers are small (576 x 192 to 576 x 1536: 0.1M to 0.9M
multiply-adds per token), so the threshold decides whether its decode steps use one thread or two. Each format is
quantized once (RTN, the ``lowbit bench`` decode formats); then, round after round, every (format, threshold)
pair is timed in turn, fp32 with them (it does not depend on the threshold: a check of the machine's drift).
Decode tokens/s, batch 1, greedy, ``--new-tokens`` after a 128-token prompt; the median over rounds.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics

import torch

from lowbit.bench import LM_FORMATS, lm_plan, machine_line
from lowbit.evaluation.speed import decode_speed
from lowbit import native
from lowbit.kernels import use_kernels
from lowbit.models import load_model
from lowbit.quantizer import quantize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--works", type=int, nargs="+", default=[0, 1 << 16, 1 << 18, 1 << 20])
    p.add_argument("--formats", nargs="+", default=["int4", "w4a8"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    print(machine_line())
    print(f"# load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    lm = load_model("smollm2-135m")
    models = {"fp32": lm.model}
    for fmt in a.formats:
        m = copy.deepcopy(lm.model)
        quantize(m, lm_plan(LM_FORMATS[fmt]), progress=False)
        use_kernels(m, keep_reference=False)
        models[fmt] = m
    prompt = torch.randint(100, 40000, (1, 128), generator=torch.Generator().manual_seed(0))
    rates: dict[tuple[str, int], list[float]] = {}
    with torch.inference_mode():
        for _ in range(a.rounds):
            for work in a.works:
                native.set_parallel_work(work)
                for name, m in models.items():
                    r = decode_speed(m, prompt, a.new_tokens, repeats=1)
                    rates.setdefault((name, work), []).append(r.decode_tokens_per_s)
    print(f"{'format':>8} " + " ".join(f"{'work ' + str(w):>14}" for w in a.works))
    for name in models:
        print(f"{name:>8} " + " ".join(f"{statistics.median(rates[(name, w)]):14.1f}" for w in a.works))
    print(f"# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")


if __name__ == "__main__":
    main()

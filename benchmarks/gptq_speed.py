"""GPTQ's calibration time and quality with float32 and bfloat16 block passes, in one run.

    python benchmarks/gptq_speed.py [--model smollm2-135m] [--scheme int4-g64-asym] [--rounds 1]

``lowbit quantize``'s GPTQ (act-order, Hessian-weighted clipped ranges) on every linear but ``lm_head``,
embeddings float, calibrated on 128 x 512 tokens of the bundled news text (seed 0), once with
``calib_dtype="float32"`` and once with ``"bfloat16"`` (the block-by-block passes under bf16 autocast), each in
a fresh process, in turns; then each model's perplexity on the README's protocol (the first 16,384 tokens of
the bundled Wikipedia text, 1,024-token windows, no BOS for SmolLM2). Columns: ``quantize()`` seconds on this
machine's threads, perplexity.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

WORKER = r"""
import json, math, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from lowbit import QuantPlan, Rule, load_model, quantize
from lowbit.data import calibration_set, token_windows, wikipedia_text
from lowbit.evaluation.perplexity import windows_nll
model_name, scheme, dtype = sys.argv[1:4]
lm = load_model(model_name)
bos = "gemma" in model_name
calib = calibration_set("causal-lm", lm.tokenizer, 128, 512, seed=0, bos=bos)
windows = token_windows(lm.tokenizer, wikipedia_text(), 1024, 16384, bos=bos)
plan = QuantPlan((Rule("*", scheme, {"name": "gptq"}),), skip=("lm_head", "type:Embedding"))
t0 = time.perf_counter()
quantize(lm.model, plan, calib, progress=False, calib_dtype=dtype)
seconds = time.perf_counter() - t0
total, n, _ = windows_nll(lm.model, windows, progress=False)
print(json.dumps({"dtype": dtype, "seconds": seconds, "ppl": math.exp(total / n)}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--scheme", default="int4-g64-asym")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()

    from lowbit.bench import machine_line

    print(machine_line())
    print(f"# {a.model}, GPTQ {a.scheme}, 128 x 512 calibration tokens; {a.threads} threads")
    print(f"{'round':>5} {'calibration passes':>18} {'quantize s':>10} {'perplexity':>10}", flush=True)
    for r in range(a.rounds):
        for dtype in ("float32", "bfloat16"):
            done = subprocess.run([sys.executable, "-c", WORKER, a.model, a.scheme, dtype, str(a.threads)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise SystemExit(f"the {dtype} run failed:\n{done.stderr[-2000:]}")
            row = json.loads(done.stdout.strip().splitlines()[-1])
            print(f"{r + 1:5d} {dtype:>18} {row['seconds']:10.1f} {row['ppl']:10.4f}", flush=True)


if __name__ == "__main__":
    main()

"""lowbit's compressed-tensors exports in transformers: perplexity against lowbit's own, and the folder read back.

    python benchmarks/compressed_tensors_ppl.py [--tokens 16384] [--method rtn|gptq] [--schemes ...]

One run, SmolLM2-135M, on the perplexity protocol of ``lowbit eval`` (bundled Wikipedia text, 1,024-token
non-overlapping windows, no BOS); the same token ids go to every evaluator. For each scheme the model is
quantized by lowbit (block linears; embedding and tied head float, lowbit's default), exported with
``lowbit.export.export_compressed_tensors`` and evaluated three ways:

* ``lowbit``: the quantized model in memory (lowbit's reference path);
* ``transformers``: the folder loaded by ``AutoModelForCausalLM.from_pretrained`` with the compressed-tensors
  package (its pack-quantized decompression, no lowbit code);
* ``read back``: the folder loaded by ``lowbit.load_model`` (lowbit's reader).
"""

from __future__ import annotations

import argparse
import math
import shutil
import tempfile
import time
from pathlib import Path

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="evaluation token budget")
    p.add_argument("--method", default="rtn", choices=("rtn", "gptq"))
    p.add_argument("--schemes", nargs="+", default=["int4-g64-asym", "int4-g32", "int8"])
    p.add_argument("--calib-samples", type=int, default=128)
    a = p.parse_args()

    from transformers import AutoModelForCausalLM

    from lowbit import QuantPlan, load_model, quantize
    from lowbit.data import calibration_set, token_windows, wikipedia_text
    from lowbit.evaluation.perplexity import windows_nll
    from lowbit.export.compressed_tensors import export_compressed_tensors
    from lowbit.plan import DEFAULT_SKIP

    lm = load_model("smollm2-135m")
    windows = token_windows(lm.tokenizer, wikipedia_text(), 1024, a.tokens, bos=False)
    calib = None
    if a.method != "rtn":
        calib = calibration_set("causal-lm", lm.tokenizer, a.calib_samples, 512, seed=0, bos=False)
    print(f"# SmolLM2-135M: {windows.shape[0]} x {windows.shape[1]} tokens of Wikipedia, no BOS; method {a.method}; "
          f"{torch.get_num_threads()} threads")

    def ppl(model) -> float:
        total, n, _ = windows_nll(model, windows, progress=False)
        return math.exp(total / n)

    work = Path(tempfile.mkdtemp(prefix="lowbit-ct-"))
    print(f"{'scheme':>16} {'MB':>7} {'lowbit ppl':>10} {'transformers':>12} {'read back':>10} {'difference':>10} "
          f"{'export s':>8}")
    try:
        for scheme in a.schemes:
            m = load_model("smollm2-135m").model
            quantize(m, QuantPlan.uniform(scheme, a.method, None, DEFAULT_SKIP), calib, progress=False)
            t0 = time.perf_counter()
            folder = export_compressed_tensors(m, work / scheme, tokenizer=lm.tokenizer)
            seconds = time.perf_counter() - t0
            own = ppl(m)
            del m
            hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
            theirs = ppl(hf)
            del hf
            back = ppl(load_model(folder).model)
            mb = sum(f.stat().st_size for f in folder.iterdir()) / 1e6
            print(f"{scheme:>16} {mb:7.1f} {own:10.4f} {theirs:12.4f} {back:10.4f} {abs(theirs - own) / own:10.2e} "
                  f"{seconds:8.1f}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

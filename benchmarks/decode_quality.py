"""What lowbit's decode engine costs in quality: teacher-forced perplexity through its steps, against the model.

    python benchmarks/decode_quality.py [--model smollm2-135m] [--windows 8] [--window 512]

The ``int4`` decode format of ``lowbit bench`` (every linear incl. ``lm_head`` ``int4-g64-asym``, round to
nearest, embedding ``int8``) on ``--windows`` windows of ``--window`` tokens of the bundled Wikipedia text (no
BOS). Rows: the model's own forward pass over each window (lowbit's kernels, float32 activations: the
reference), and the decode engine fed the same tokens one step at a time, with float32 activations (``exact``)
and with its default int8 activation blocks (32 columns for each step; the first token goes through the prompt
path). Columns: perplexity, its change against the reference, and how often the engine's top-1 token equals the
reference's.
"""

from __future__ import annotations

import argparse
import math
import time

import torch
import torch.nn.functional as F


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from lowbit.bench import LM_FORMATS, lm_plan, machine_line
    from lowbit.data import token_windows, wikipedia_text
    from lowbit.kernels import use_kernels
    from lowbit.models import load_model
    from lowbit.quantizer import quantize
    from lowbit.runtime.native_lm import NativeLM

    lm = load_model(a.model)
    windows = token_windows(lm.tokenizer, wikipedia_text(), a.window, a.window * a.windows, bos=False)
    quantize(lm.model, lm_plan(LM_FORMATS["int4"]), None, progress=False)
    use_kernels(lm.model, keep_reference=False)
    print(machine_line())
    print(f"# {lm.name}, int4 decode format; {windows.shape[0]} x {windows.shape[1]} tokens of Wikipedia, no BOS")
    with torch.inference_mode():
        reference = [lm.model(w[None]).logits[0].float() for w in windows]
    n = sum(len(w) - 1 for w in windows)
    ref_nll = sum(float(F.cross_entropy(r[:-1], w[1:], reduction="sum")) for r, w in zip(reference, windows))
    ref_ppl = math.exp(ref_nll / n)
    print(f"{'path':>28} {'perplexity':>10} {'vs reference':>12} {'top-1 = reference':>18} {'seconds':>8}")
    print(f"{'model forward (reference)':>28} {ref_ppl:10.3f} {'':>12} {'':>18} {'':>8}")
    for exact in (True, False):
        engine = NativeLM(lm.model, max_len=a.window + 1, exact=exact)
        nll, same, t0 = 0.0, 0, time.perf_counter()
        with torch.inference_mode():
            for w, ref in zip(windows, reference):
                logits = engine.prefill(w[:1])
                for t in range(1, len(w)):
                    nll += float(F.cross_entropy(logits[None], w[t:t + 1], reduction="sum"))
                    same += int(logits.argmax() == ref[t - 1].argmax())
                    logits = engine.step(int(w[t]), t)
        ppl = math.exp(nll / n)
        name = "engine, float32 activations" if exact else "engine, int8 activation blocks"
        print(f"{name:>28} {ppl:10.3f} {100 * (ppl / ref_ppl - 1):+11.2f}% {100 * same / n:17.2f}% "
              f"{time.perf_counter() - t0:8.0f}", flush=True)


if __name__ == "__main__":
    main()

"""lowbit's GPTQ in llama.cpp's Q4_K_M layout against llama.cpp's own Q4_K_M of the same float model.

    make bench-deps     # llama-cpp-python (compiles llama.cpp)
    python benchmarks/gguf_kquants.py [--mix Q4_K_M] [--tokens 16384] [--calib-samples 128]

One run, SmolLM2-135M, on the perplexity protocol of ``lowbit eval`` (bundled Wikipedia text, 1,024-token
non-overlapping windows, no BOS); the same token ids go to every evaluator:

* ``llama.cpp``: the float model written by ``lowbit.export.export_gguf`` (every tensor F32), quantized by
  llama.cpp itself (``llama_model_quantize`` with the mix's ftype, its own per-tensor choices, no importance
  matrix);
* ``lowbit rtn`` / ``lowbit gptq``: the same float model quantized by lowbit with
  ``lowbit.export.gguf_mix.gguf_mix_plan`` (llama.cpp's per-tensor types for the mix; values by round to nearest,
  or by GPTQ on 128 x 512 calibration tokens of the bundled news text; embedding and tied head by round to
  nearest), exported by ``lowbit.export.export_gguf``.

Columns: each tensor type's count, file size, perplexity by lowbit (its reference path, before export) and by
llama.cpp reading the file; llama.cpp's prefill for 128 tokens and greedy decode tokens/s.
"""

from __future__ import annotations

import argparse
import collections
import math
import tempfile
import time
from pathlib import Path

import torch

from gguf_llamacpp import llama_cpp_ppl_and_speed, llama_cpp_quantize


def tensor_types(path: Path) -> str:
    import gguf

    counts = collections.Counter(t.tensor_type.name for t in gguf.GGUFReader(path).tensors if t.name != "F32")
    return " ".join(f"{k}:{v}" for k, v in sorted(counts.items()) if k != "F32")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mix", default="Q4_K_M")
    p.add_argument("--tokens", type=int, default=16384, help="evaluation token budget")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--methods", nargs="+", default=["rtn", "gptq"])
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from lowbit import load_model, quantize
    from lowbit.data import calibration_set, token_windows, wikipedia_text
    from lowbit.evaluation.perplexity import windows_nll
    from lowbit.export import export_gguf
    from lowbit.export.gguf_mix import gguf_mix_plan

    lm = load_model("smollm2-135m")
    windows = token_windows(lm.tokenizer, wikipedia_text(), 1024, a.tokens, bos=False)
    print(f"# SmolLM2-135M, mix {a.mix}: {windows.shape[0]} x {windows.shape[1]} tokens of Wikipedia, no BOS; "
          f"{a.threads} threads")
    work = Path(tempfile.mkdtemp(prefix="lowbit-kq-"))
    rows = []
    f32 = export_gguf(lm.model, lm.source, work / "float-f32.gguf")
    theirs = work / f"llama.cpp-{a.mix}.gguf"
    llama_cpp_quantize(f32, theirs, a.threads, ftype=a.mix, embedding=None)
    rows.append((f"llama.cpp {a.mix}", float("nan"), theirs, "-"))
    calib = calibration_set("causal-lm", lm.tokenizer, a.calib_samples, 512, seed=0, bos=False)
    for method in a.methods:
        m = load_model("smollm2-135m").model
        t0 = time.perf_counter()
        quantize(m, gguf_mix_plan(m, a.mix, method), calib if method != "rtn" else None, progress=False)
        seconds = time.perf_counter() - t0
        total, n, _ = windows_nll(m, windows, progress=False)
        path = export_gguf(m, lm.source, work / f"lowbit-{method}.gguf")
        rows.append((f"lowbit {method}", math.exp(total / n), path, f"{seconds:.0f} s"))
        del m

    print(f"{'file':>18} {'MB':>8} {'lowbit ppl':>10} {'llama.cpp':>10} {'prefill ms':>10} {'tok/s':>7} "
          f"{'quantize':>9}  types")
    for name, own, path, qt in rows:
        ppl, prefill, tps = llama_cpp_ppl_and_speed(path, windows, a.threads)
        own_s = "-" if math.isnan(own) else f"{own:.3f}"
        print(f"{name:>18} {path.stat().st_size / 1e6:8.3f} {own_s:>10} {ppl:10.3f} {1000 * prefill:10.1f} "
              f"{tps:7.1f} {qt:>9}  {tensor_types(path)}", flush=True)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()

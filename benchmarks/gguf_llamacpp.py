"""lowbit GGUF files in llama.cpp: perplexity against lowbit's own evaluation, and GPTQ Q4_0 against llama.cpp's Q4_0.

    make bench-deps     # llama-cpp-python (compiles llama.cpp)
    python benchmarks/gguf_llamacpp.py [--tokens 16384] [--calib-samples 128]

One run, SmolLM2-135M, on the perplexity protocol of ``lowbit eval`` (bundled Wikipedia text, 1,024-token
non-overlapping windows, no BOS); the same token ids go to every evaluator:

* ``float-f32``: the float model written by ``lowbit.export.export_gguf`` (every tensor F32);
* ``llama.cpp-q4_0``: that file quantized by llama.cpp itself (``llama_model_quantize``, Q4_0, token
  embedding Q8_0; the head is tied to it);
* ``lowbit-rtn-q4_0`` and ``lowbit-gptq-q4_0``: lowbit ``int4-g32`` (Q4_0) block linears by round to nearest /
  GPTQ (128 x 512 calibration tokens of the bundled news text), embedding ``int8-g32`` (Q8_0), exported
  by lowbit.

Columns: perplexity by lowbit (its reference path, before export), by transformers loading the GGUF, and
by llama.cpp; llama.cpp's prefill time for 128 tokens and greedy decode tokens/s (batch 1, 128 tokens).
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def llama_cpp_ppl_and_speed(path: Path, windows: torch.Tensor, threads: int) -> tuple[float, float, float]:
    """(perplexity, prefill seconds for 128 tokens, decode tokens/s) of a GGUF file in llama.cpp."""
    from llama_cpp import Llama

    window = windows.shape[1]
    llm = Llama(model_path=str(path), n_ctx=window, n_batch=window, n_ubatch=window, logits_all=True,
                n_threads=threads, n_threads_batch=threads, verbose=False)
    total, count = 0.0, 0
    for row in windows.tolist():
        llm.reset()
        llm.eval(row)
        logits = torch.from_numpy(np.array(llm.scores[: len(row)], dtype=np.float32))
        nll = torch.nn.functional.cross_entropy(logits[:-1], torch.tensor(row[1:]), reduction="sum")
        total += float(nll)
        count += len(row) - 1
    prompt = windows[0, :128].tolist()
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    prefill = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(128):
        llm.eval([int(np.argmax(llm.scores[llm.n_tokens - 1]))])
    decode = 128 / (time.perf_counter() - t0)
    del llm
    return math.exp(total / count), prefill, decode


def llama_cpp_quantize(src: Path, dst: Path, threads: int, ftype: str = "Q4_0", embedding: str | None = "Q8_0"
                       ) -> None:
    """llama.cpp's own quantization of ``src`` (``llama_model_quantize``) to the mix ``ftype``; ``embedding``: the
    token embedding's type (None: the mix's own choice)."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    if embedding is not None:
        params.token_embedding_type = getattr(llama_cpp, f"GGML_TYPE_{embedding}")
    params.nthread = threads
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed ({rc})")


def transformers_ppl(path: Path, windows: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    from lowbit.evaluation.perplexity import windows_nll

    m = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    m.tie_weights()
    total, n, _ = windows_nll(m, windows, progress=False)
    return math.exp(total / n)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="evaluation token budget")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    from lowbit import QuantPlan, load_model, quantize
    from lowbit.data import calibration_set, token_windows, wikipedia_text
    from lowbit.evaluation.perplexity import windows_nll
    from lowbit.export import export_gguf
    from lowbit.plan import Rule

    lm = load_model("smollm2-135m")
    windows = token_windows(lm.tokenizer, wikipedia_text(), 1024, a.tokens, bos=False)
    print(f"# SmolLM2-135M: {windows.shape[0]} x {windows.shape[1]} tokens of Wikipedia, no BOS; "
          f"{a.threads} threads")
    work = Path(tempfile.mkdtemp(prefix="lowbit-gguf-"))
    rows = []

    def lowbit_ppl(model) -> float:
        total, n, _ = windows_nll(model, windows, progress=False)
        return math.exp(total / n)

    f32 = export_gguf(lm.model, lm.source, work / "float-f32.gguf")
    rows.append(("float-f32", lowbit_ppl(lm.model), f32, "-"))
    q40 = work / "llama.cpp-q4_0.gguf"
    llama_cpp_quantize(f32, q40, a.threads)
    rows.append(("llama.cpp-q4_0", float("nan"), q40, "-"))
    calib = calibration_set("causal-lm", lm.tokenizer, a.calib_samples, a.calib_len, seed=0, bos=False)
    for name, method in (("lowbit-rtn-q4_0", "rtn"), ("lowbit-gptq-q4_0", "gptq")):
        m = load_model("smollm2-135m").model
        plan = QuantPlan((Rule("*embed_tokens", "int8-g32"), Rule("lm_head", "int8-g32"),
                          Rule("*", "int4-g32", method)), skip=())
        t0 = time.perf_counter()
        quantize(m, plan, calib if method != "rtn" else None, progress=False)
        qt = time.perf_counter() - t0
        path = export_gguf(m, lm.source, work / f"{name}.gguf")
        rows.append((name, lowbit_ppl(m), path, f"{qt:.0f} s"))
        del m

    print(f"{'file':>18} {'MB':>7} {'lowbit ppl':>10} {'transformers':>12} {'llama.cpp':>10} {'prefill ms':>10} "
          f"{'tok/s':>7} {'quantize':>9}")
    for name, own, path, qt in rows:
        tf = transformers_ppl(path, windows)
        lc, prefill, tps = llama_cpp_ppl_and_speed(path, windows, a.threads)
        own_s = "-" if math.isnan(own) else f"{own:.3f}"
        print(f"{name:>18} {path.stat().st_size / 1e6:7.1f} {own_s:>10} {tf:12.3f} {lc:10.3f} {1000 * prefill:10.1f} "
              f"{tps:7.1f} {qt:>9}", flush=True)
    for f in work.iterdir():
        f.unlink()
    work.rmdir()


if __name__ == "__main__":
    main()

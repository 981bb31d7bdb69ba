"""GGUF exports of the architectures lowbit quantizes, read by llama.cpp: logits of tiny models, perplexity of
Gemma-3-270M, and AWQ scales folded for export.

    make bench-deps     # llama-cpp-python (compiles llama.cpp)
    python benchmarks/gguf_architectures.py [--tokens 4096] [--skip-gemma]

Part 1, tiny random models (2 layers, width 256, vocabulary 49,152) of Llama, Mistral, Qwen2 (q/k/v biases), Qwen3
(q/k norms) and Gemma-3 (text), random biases and norm gains, quantized by lowbit to llama.cpp's Q4_K_M types
(``gguf_mix_plan``, round to nearest) and exported; SmolLM2's tokenizer metadata is copied into each file so that
llama.cpp loads it (the token ids are all that matter here). llama.cpp evaluates 64 random tokens; the table
gives the largest difference of its logits from lowbit's, relative to their range, and how often both pick the
same next token.

Part 2, Gemma-3-270M (bundled), on the perplexity protocol of ``lowbit eval`` (Wikipedia, 1,024-token windows,
with BOS as Gemma needs): the float model written as F32, lowbit's round to nearest in the Q4_K_M layout, and the
same after AWQ's scales (``transforms: [awq_scales]``, 128 x 512 news tokens) folded into the norms and up
projections, so the file needs no input scales. Perplexity by lowbit, by transformers reading the file and by
llama.cpp.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from gguf_llamacpp import llama_cpp_ppl_and_speed, transformers_ppl

FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "gemma3")


def tiny(family: str) -> torch.nn.Module:
    from lowbit.models.tiny import tiny_decoder

    # llama.cpp scales Gemma-3's queries by 1 / sqrt(head_dim), as every Gemma-3 checkpoint does
    extra = {"query_pre_attn_scalar": 64} if family == "gemma3" else {}
    return tiny_decoder(family, vocab_size=49152, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256,
                        tie_word_embeddings=True, **extra)


def llama_cpp_logits(path: Path, ids: list[int], threads: int) -> torch.Tensor:
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True, n_threads=threads,
                verbose=False)
    llm.eval(ids)
    out = torch.from_numpy(np.array(llm.scores[: len(ids)], dtype=np.float32))
    del llm
    return out


def part_tiny(work: Path, threads: int) -> None:
    from lowbit import load_model, quantize
    from lowbit.export import export_gguf
    from lowbit.export.gguf_mix import gguf_mix_plan

    source = load_model("smollm2-135m").source  # its GGUF's tokenizer metadata is copied into every file
    ids = torch.randint(0, 49152, (64,), generator=torch.Generator().manual_seed(0)).tolist()
    print("# tiny models, Q4_K_M layout (RTN), 64 random tokens; llama.cpp's logits against lowbit's")
    print(f"{'family':>8} {'GGUF arch':>9} {'max |diff| / range':>18} {'same argmax':>11}  types")
    for family in FAMILIES:
        model = tiny(family)
        quantize(model, gguf_mix_plan(model, "Q4_K_M"), progress=False)
        path = export_gguf(model, source, work / f"{family}.gguf")
        with torch.no_grad():
            want = model(torch.tensor([ids])).logits[0]
        got = llama_cpp_logits(path, ids, threads)
        rel = float((got - want).abs().max() / (want.max() - want.min()))
        same = float((got.argmax(-1) == want.argmax(-1)).float().mean())
        import gguf

        reader = gguf.GGUFReader(path)
        kinds = sorted({t.tensor_type.name for t in reader.tensors} - {"F32"})
        print(f"{family:>8} {reader.fields['general.architecture'].contents():>9} {rel:18.2e} {same:11.1%}  "
              f"{' '.join(kinds)}", flush=True)


def part_gemma(work: Path, tokens: int, threads: int) -> None:
    from lowbit import load_model, quantize
    from lowbit.data import calibration_set, token_windows, wikipedia_text
    from lowbit.evaluation.perplexity import windows_nll
    from lowbit.export import export_gguf
    from lowbit.export.gguf_mix import gguf_mix_plan

    lm = load_model("gemma3-270m")
    windows = token_windows(lm.tokenizer, wikipedia_text(), 1024, tokens, bos=True)
    calib = calibration_set("causal-lm", lm.tokenizer, 128, 512, seed=0, bos=True)
    print(f"\n# Gemma-3-270M: {windows.shape[0]} x {windows.shape[1]} tokens of Wikipedia, BOS; {threads} threads")
    print(f"{'file':>22} {'MB':>7} {'lowbit ppl':>10} {'transformers':>12} {'llama.cpp':>10} {'quantize':>9}")

    def row(name: str, model, seconds: str) -> None:
        total, n, _ = windows_nll(model, windows, progress=False)
        path = export_gguf(model, lm.source, work / f"{name}.gguf")
        tf = transformers_ppl(path, windows)
        lc, _, _ = llama_cpp_ppl_and_speed(path, windows, threads)
        print(f"{name:>22} {path.stat().st_size / 1e6:7.1f} {math.exp(total / n):10.3f} {tf:12.3f} {lc:10.3f} "
              f"{seconds:>9}", flush=True)
        path.unlink()

    row("float-f32", lm.model, "-")
    for name, transforms in (("lowbit-rtn-q4_k_m", ()), ("lowbit-awq-rtn-q4_k_m", ("awq_scales",))):
        m = load_model("gemma3-270m").model
        plan = gguf_mix_plan(m, "Q4_K_M", "rtn", transforms)
        t0 = time.perf_counter()
        quantize(m, plan, calib if transforms else None, progress=False)
        row(name, m, f"{time.perf_counter() - t0:.0f} s")
        del m


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096, help="Gemma-3 evaluation token budget")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-gemma", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    work = Path(tempfile.mkdtemp(prefix="lowbit-arch-"))
    try:
        part_tiny(work, a.threads)
        if not a.skip_gemma:
            part_gemma(work, a.tokens, a.threads)
    finally:
        for f in work.iterdir():
            f.unlink()
        work.rmdir()


if __name__ == "__main__":
    main()

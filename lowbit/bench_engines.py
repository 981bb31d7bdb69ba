"""``lowbit bench --sections engines``: greedy decode of one causal LM on every engine, in one process, in turns.

Rows (SmolLM2-135M by default, batch 1, a ``prompt_tokens`` prompt of bundled Wikipedia text, ``new_tokens`` new):

* ``fp32 eager`` / ``bf16 eager``: the float model's own forward pass per token (transformers, dynamic cache);
* ``int4 eager``: lowbit's ``int4`` decode format (every linear incl. ``lm_head`` ``int4-g64-asym`` by round to
  nearest, embedding ``int8``) through its per-layer kernels, one forward pass per token;
* ``int4 engine``: the same model on lowbit's decode engine (``lowbit.runtime.native_lm``: one C++ call per token,
  int8 activation blocks in the 4-bit products on CPUs with AVX-512 VNNI); ``int4 engine exact``: float32
  activations; ``fp32 engine``: the float model on the engine;
* ``llama.cpp Q4_0`` / ``Q4_K_M``: the float model exported to GGUF by lowbit, quantized by llama.cpp itself
  (``llama_model_quantize``), run by llama-cpp-python (``make bench-deps``; rows say so when it is missing).

Every engine runs once per round, the rounds in turn, so a change in the machine's load touches them alike;
the table gives each one's median. Prefill is the prompt's forward pass (lowbit's engine takes it from the
model in torch). ``MB/token`` is what a decode step reads: the weights of every linear (the embedding: one row)
and the key/value cache at the mean position; ``of bandwidth``: tokens/s x MB/token against the read bandwidth
measured in the same run (a sum over a 512 MB float32 tensor, torch, all threads).

With ``busy=True`` a second table repeats the int4 engine (thread count ``auto``, 1 and all threads) and
llama.cpp Q4_0 while a spinning process this benchmark starts and stops keeps one core busy.
"""

from __future__ import annotations

import contextlib
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowbit.quiet import quiet_fd


@contextlib.contextmanager
def busy_core(on: bool = True):
    """One spinning shell loop while the block runs (nothing when ``on`` is False)."""
    spinner = subprocess.Popen(["sh", "-c", "while :; do :; done"]) if on else None
    try:
        time.sleep(0.2 if on else 0.0)
        yield
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()


def read_bandwidth(mb: int = 512, repeats: int = 7) -> float:
    """Bytes/s of a float32 sum over ``mb`` MB (torch, its current threads), median of ``repeats``."""
    x = torch.ones(mb * 2**20 // 4)
    x.sum()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
    return x.numel() * 4 / statistics.median(times)


def linear_bytes(model: nn.Module) -> int:
    """Bytes a decode step of ``model`` reads for its linears: kernels' packed copies, else weights (+ biases)."""
    from lowbit.nn.base import KERNEL_ATTR, QuantModule

    total = 0
    for m in model.modules():
        if isinstance(m, QuantModule) and hasattr(m, "in_features"):
            packed = m.__dict__.get(KERNEL_ATTR)
            total += packed.nbytes() if packed is not None else m.qweight.nbytes
        elif isinstance(m, nn.Linear):
            total += m.weight.nbytes + (m.bias.nbytes if m.bias is not None else 0)
    return total


def kv_bytes(model: nn.Module, position: float, element: int = 4) -> int:
    """Bytes of keys and values a decode step at ``position`` reads (every layer, ``element`` bytes a value)."""
    cfg = model.config
    heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return int(2 * cfg.num_hidden_layers * heads * head_dim * position * element)


class _TorchRow:
    def __init__(self, model: nn.Module, engine: str, exact: bool = False, threads: int | str = "auto"):
        from lowbit.runtime.generate import Generator

        self.gen = Generator(model, engine=engine, threads=threads, exact=exact, max_len=256)
        self.bytes = linear_bytes(model)
        self.model = model

    def run(self, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, dict]:
        n = len(list(self.gen.tokens(prompt, new_tokens)))
        if n != new_tokens:
            raise RuntimeError(f"asked for {new_tokens} tokens, got {n}")
        st = self.gen.stats
        return st.prefill_seconds, st.decode_tokens_per_s, dict(st.threads)


class _LlamaCppRow:
    def __init__(self, path: Path, threads: int, n_ctx: int):
        from llama_cpp import Llama

        with quiet_fd(2):  # llama.cpp's C code logs every tensor there
            self.llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                             n_threads_batch=threads, verbose=False)
        self.bytes, self.threads = gguf_step_bytes(path), threads

    def run(self, prompt: torch.Tensor, new_tokens: int) -> tuple[float, float, dict]:
        import numpy as np

        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt.tolist())
        prefill = time.perf_counter() - t0
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t0 = time.perf_counter()
        for _ in range(new_tokens - 1):  # as lowbit's rows: the first new token comes from the prefill
            llm.eval([token])
            token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        return prefill, (new_tokens - 1) / (time.perf_counter() - t0), {self.threads: new_tokens - 1}


def gguf_step_bytes(path: Path) -> int:
    """Bytes of a GGUF file's tensors a decode step reads: all but the token embedding, which counts only when
    it is also the output matrix (no ``output.weight``)."""
    from gguf import GGUFReader

    tensors = {t.name: int(t.n_bytes) for t in GGUFReader(str(path)).tensors}
    tied = "output.weight" not in tensors
    return sum(n for name, n in tensors.items() if tied or name != "token_embd.weight")


def llama_cpp_files(model: nn.Module, source: dict, work: Path, threads: int) -> tuple[dict[str, Path], str | None]:
    """llama.cpp's own Q4_0 and Q4_K_M of the float model, or ({}, why not)."""
    try:
        import llama_cpp
    except ImportError:
        return {}, "llama-cpp-python is not installed (make bench-deps)"
    from lowbit.export import export_gguf

    try:
        f32 = export_gguf(model, source, work / "float-f32.gguf")
    except Exception as e:  # an architecture lowbit cannot write to GGUF
        return {}, f"the float model could not be written as GGUF: {e}"
    out = {}
    for name, ftype in (("Q4_0", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0), ("Q4_K_M", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M)):
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype, params.nthread = ftype, threads
        dst = work / f"{name}.gguf"
        with quiet_fd(2):  # llama.cpp's C code logs every tensor there
            rc = llama_cpp.llama_model_quantize(str(f32).encode(), str(dst).encode(), params)
        if rc != 0:
            return {}, f"llama_model_quantize failed for {name}"
        out[name] = dst
    f32.unlink()
    return out, None


def _measure(rows: dict[str, Any], prompt: torch.Tensor, new_tokens: int, rounds: int,
             say: Callable[[str], None]) -> dict[str, dict]:
    """Every row once per round, in turns; medians."""
    got: dict[str, list] = {name: [] for name in rows}
    for r in range(rounds):
        for name, row in rows.items():
            got[name].append(row.run(prompt, new_tokens))
        say(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {v[-1][1]:.1f}" for n, v in got.items()))
    return {name: {"prefill_seconds": statistics.median(v[0] for v in vals),
                   "decode_tokens_per_s": statistics.median(v[1] for v in vals),
                   "threads": vals[-1][2], "rounds": [v[1] for v in vals]} for name, vals in got.items()}


def bench_engines(model_name: str = "smollm2-135m", prompt_tokens: int = 128, new_tokens: int = 128,
                  rounds: int = 3, busy: bool = True, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure and print the tables described in the module docstring; return every number."""
    from lowbit.bench import LM_FORMATS, lm_plan
    from lowbit.data import token_windows, wikipedia_text
    from lowbit.kernels import use_kernels
    from lowbit.models import load_model
    from lowbit.quantizer import quantize
    from lowbit.runtime import native_lm

    threads = torch.get_num_threads()
    lm = load_model(model_name)
    prompt = token_windows(lm.tokenizer, wikipedia_text(), prompt_tokens, max_tokens=prompt_tokens)[0]
    int4 = load_model(model_name).model
    quantize(int4, lm_plan(LM_FORMATS["int4"]), None, progress=False)
    use_kernels(int4, keep_reference=False)
    bf16 = load_model(model_name).model.to(torch.bfloat16)
    native_ok = native_lm.why_not(int4)
    work = Path(tempfile.mkdtemp(prefix="lowbit-engines-"))
    try:
        files, why_no_llama = llama_cpp_files(lm.model, lm.source, work, threads)
        rows: dict[str, Any] = {"fp32 eager": _TorchRow(lm.model, "eager"), "bf16 eager": _TorchRow(bf16, "eager"),
                                "int4 eager": _TorchRow(int4, "eager")}
        if native_ok is None:
            rows.update({"fp32 engine": _TorchRow(lm.model, "native", exact=True),
                         "int4 engine exact": _TorchRow(int4, "native", exact=True),
                         "int4 engine": _TorchRow(int4, "native")})
        n_ctx = prompt_tokens + new_tokens + 8
        try:
            for name, path in files.items():
                rows[f"llama.cpp {name}"] = _LlamaCppRow(path, threads, n_ctx)
        except ValueError as e:  # llama-cpp-python's "Failed to load model from file"
            why_no_llama, files = f"llama.cpp could not load lowbit's GGUF of this model ({e})", {}
            rows = {k: v for k, v in rows.items() if not k.startswith("llama.cpp")}
        say(f"\n## {lm.name}: decode engines (batch 1, greedy, {new_tokens} new tokens after a {prompt_tokens}-token "
            f"prompt, {threads} threads, {rounds} rounds in turns; median)")
        if native_ok is not None:
            say(f"  (lowbit's decode engine cannot run this model: {native_ok})")
        if why_no_llama:
            say(f"  (no llama.cpp rows: {why_no_llama})")
        bandwidth = read_bandwidth()
        quiet = _measure(rows, prompt, new_tokens, rounds, say)
        bandwidth = (bandwidth + read_bandwidth()) / 2  # before and after, averaged
        mean_pos = prompt_tokens + new_tokens / 2
        say(f"{'engine':>20} {'prefill ms':>10} {'tok/s':>8} {'vs fp32':>8} {'MB/token':>9} {'GB/s':>6} "
            f"{'of bandwidth':>12}")
        base = quiet["fp32 eager"]["decode_tokens_per_s"]
        for name, r in quiet.items():
            row = rows[name]
            kv = kv_bytes(lm.model, mean_pos, 2 if name.startswith("llama.cpp") else (2 if "bf16" in name else 4))
            per_token = row.bytes + kv
            rate = r["decode_tokens_per_s"] * per_token
            r.update(bytes_per_token=per_token, read_bytes_per_s=rate, bandwidth_fraction=rate / bandwidth)
            say(f"{name:>20} {1000 * r['prefill_seconds']:10.1f} {r['decode_tokens_per_s']:8.1f} "
                f"{r['decode_tokens_per_s'] / base:7.2f}x {per_token / 1e6:9.1f} {rate / 1e9:6.1f} "
                f"{100 * rate / bandwidth:11.0f}%")
        say(f"  read bandwidth (torch sum over 512 MB, {threads} threads): {bandwidth / 1e9:.1f} GB/s")
        out = {"machine_threads": threads, "bandwidth_bytes_per_s": bandwidth, "quiet": quiet}
        if busy and native_ok is None:
            out["busy"] = _busy_table(int4, files, threads, n_ctx, prompt, new_tokens, rounds, say)
        return out
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _busy_table(int4, files, threads, n_ctx, prompt, new_tokens, rounds, say) -> dict:
    rows: dict[str, Any] = {"int4 engine auto": _TorchRow(int4, "native", threads="auto"),
                            "int4 engine 1 thread": _TorchRow(int4, "native", threads=1),
                            f"int4 engine {threads} threads": _TorchRow(int4, "native", threads=threads)}
    if "Q4_0" in files:
        rows["llama.cpp Q4_0 1 thread"] = _LlamaCppRow(files["Q4_0"], 1, n_ctx)
        rows[f"llama.cpp Q4_0 {threads} threads"] = _LlamaCppRow(files["Q4_0"], threads, n_ctx)
    say(f"\n## the same with one core kept busy (a spinning process started and stopped by this benchmark)")
    with busy_core():
        busy = _measure(rows, prompt, new_tokens, rounds, say)
    say(f"{'engine':>26} {'tok/s':>8}  thread counts used (steps)")
    for name, r in busy.items():
        used = ", ".join(f"{t}: {n}" for t, n in sorted(r["threads"].items()))
        say(f"{name:>26} {r['decode_tokens_per_s']:8.1f}  {used}")
    return busy

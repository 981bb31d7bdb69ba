"""Weight-only post-training quantization of language models: perplexity, time and memory by method.

One table, every row measured in this run: for each model, the float model, then for each scheme
(W4 group 64, W4 group 128, W4 per channel, W3 group 64, W2 group 64; all asymmetric, every linear layer
but ``lm_head``, embeddings float) each method: round to nearest, round to nearest with the
Hessian-weighted clipping search, AWQ, GPTQ, AWQ followed by GPTQ, and the last two with GPTQ solved
true-sequentially inside each block with damping 0.1 (``gptq-seq``, ``recipes/w3-gptq-sequential.yaml``;
``awq+gptq-seq``, ``recipes/w4-awq-gptq.yaml``).

Protocol (printed with the table):
- evaluation: perplexity on the bundled Wikipedia text, first ``--tokens`` tokens, 1024-token
  non-overlapping windows, BOS by the model's rule (``lowbit.models.default_bos``: SmolLM2 without,
  Gemma-3 with);
- calibration (data-aware methods only): ``--calib-samples`` windows of ``--calib-len`` tokens of the
  bundled *news* text (disjoint from the evaluation text), seed 0, same BOS rule;
- time: wall time of ``lowbit.quantize`` (block-sequential calibration included), ``--threads`` threads;
- memory: ``peak x`` = (float model bytes + the largest rise of the process's resident memory during
  ``quantize``) / float model bytes, i.e. peak memory relative to the float model. Where
  ``/proc/self/clear_refs`` cannot be written the peak is sampled every 5 ms.
- isolation: each quantized row runs in a fresh Python process (this script with ``--row``), as a
  ``lowbit quantize`` command would, so no row depends on the rows before it. In one long process the C
  allocator keeps memory that earlier rows freed, in pieces that later rows cannot always reuse: with the
  same code, GPTQ's peak at W4 g64 measured 2.42x the float model as a process's fourth row and 2.15x in a
  process of its own.

The evaluation runs the quantized modules with their dequantized weights cached (``lowbit.nn.cached_weights``):
the same numbers as the reference forward, computed once instead of on every call.

    python benchmarks/llm_quality.py                       # everything (several hours on 2 cores)
    python benchmarks/llm_quality.py --models smollm2-135m --schemes w4g64 w3g64 --json out.jsonl
    python benchmarks/llm_quality.py --json grid.jsonl --resume   # continue an interrupted run

With ``--resume`` the rows already in the ``--json`` file are kept and not measured again, but only if they
were measured by the same code (git's hashes of ``lowbit/`` and of this script, no uncommitted changes) with the
same protocol, calibration set, thread count and torch version: the file's rows then form one run, measured
in several sittings. A file from other code or settings is refused.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from lowbit.data import calibration_set
from lowbit.evaluation import fitting_protocol, model_size, perplexity
from lowbit.errors import InputError
from lowbit.memory import PeakRSS, release_free_memory
from lowbit.models import default_bos, load_model
from lowbit.nn import cached_weights
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize
from rows import emit, previous_rows, row_in_new_process, run_key

# what identifies a row of the --json file (for --resume)
ROW_KEY = ("model", "scheme", "method")

SCHEMES = {
    "w4g64": "int4-g64-asym",
    "w4g128": "int4-g128-asym",
    "w4ch": "int4-ch-asym",
    "w3g64": "int3-g64-asym",
    "w2g64": "int2-g64-asym",
}
METHODS = {
    "rtn": {"name": "rtn"},
    "rtn+clip": {"name": "rtn", "clip_search": True, "weighted": True},
    "awq": {"name": "awq"},
    "gptq": {"name": "gptq"},
    "awq+gptq": {"name": "awq", "then": {"name": "gptq"}},
    "gptq-seq": {"name": "gptq", "true_sequential": True, "percdamp": 0.1},
    "awq+gptq-seq": {"name": "awq", "then": {"name": "gptq", "true_sequential": True, "percdamp": 0.1}},
}
# "<transform>+<method>": the method after a float equivalence transform (lowbit.transforms)
TRANSFORMED = {"rot": ("rotate",), "rotin": ("rotate_inputs",)}
for _t in TRANSFORMED:
    for _m in ("rtn", "gptq", "gptq-seq"):
        METHODS[f"{_t}+{_m}"] = METHODS[_m]


def plan_for(spec: str, method: str) -> QuantPlan:
    """The plan of one row: ``spec`` everywhere (lm_head and embeddings float) by ``method``."""
    plan = QuantPlan.uniform(spec, METHODS[method])
    prefix = method.split("+", 1)[0]
    if prefix in TRANSFORMED and method.split("+", 1)[1] in METHODS:
        plan = QuantPlan(plan.rules, plan.skip, TRANSFORMED[prefix])
    return plan


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES), help=f"{', '.join(SCHEMES)} or spec names")
    p.add_argument("--methods", nargs="+", default=[m for m in METHODS if "+" not in m or m.startswith("awq")],
                   choices=list(METHODS), help="rot+...: after the 'rotate' transform; rotin+...: after "
                   "'rotate_inputs'")
    p.add_argument("--tokens", type=int, default=16384, help="evaluation token budget")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None, help="append one JSON line per row to this file")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json (same code and settings)")
    p.add_argument("--row", nargs=3, metavar=("MODEL", "SPEC", "METHOD"), help=argparse.SUPPRESS)
    p.add_argument("--row-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.resume and not a.json:
        p.error("--resume needs --json FILE")
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.row:
        Path(a.row_out).write_text(json.dumps(measure_row(*a.row, a)), encoding="utf-8")
        return
    for scheme in a.schemes:  # a bad scheme fails here, not hours into the run
        for method in a.methods:
            try:
                plan_for(SCHEMES.get(scheme, scheme), method)
            except InputError as e:
                p.error(f"--schemes {scheme}: {e}")
    a.run = run_key(__file__, a)
    a.done = previous_rows(a.json, a.run, ROW_KEY) if a.resume else {}

    rows = []
    print(f"calibration: {a.calib_samples} x {a.calib_len} tokens of news text, seed 0; {a.threads} threads; "
          f"code {a.run['code']}" + (f"; {len(a.done)} row(s) from {a.json}" if a.done else ""))
    print(_header(), flush=True)
    for name in a.models:
        rows += run_model(name, a)
    print("\nall rows:")
    print(_header())
    for r in rows:
        print(_line(r))


def run_model(name: str, a: argparse.Namespace) -> list[dict]:
    lm = load_model(name)
    bos = default_bos(lm)
    proto = fitting_protocol(lm.model, a.tokens, bos=bos)
    print(f"# {lm.name}: {proto.describe()}", flush=True)
    row = a.done.get((name, "float", "-"))
    if row is None:
        base = perplexity(lm.model, lm.tokenizer, proto, progress=False).ppl
        row = _emit(a, {"model": name, "scheme": "float", "method": "-", "ppl": base, "vs_float": 1.0,
                        "seconds": 0.0, "peak_x": 1.0, "protocol": proto.describe()})
    else:
        print(_line(row) + "  (earlier sitting)", flush=True)
    rows, base = [row], row["ppl"]
    for scheme in a.schemes:
        spec = SCHEMES.get(scheme, scheme)
        for method in a.methods:
            if (name, spec, method) in a.done:
                rows.append(a.done[(name, spec, method)])
                print(_line(rows[-1]) + "  (earlier sitting)", flush=True)
                continue
            r = row_in_new_process(__file__, [name, spec, method], a)
            rows.append(_emit(a, {"model": name, "scheme": spec, "method": method, "ppl": r["ppl"],
                                  "vs_float": r["ppl"] / base, "seconds": r["seconds"], "peak_x": r["peak_x"],
                                  "bits": r["bits"], "protocol": proto.describe()}))
    return rows


def measure_row(name: str, spec: str, method: str, a: argparse.Namespace) -> dict:
    """Load ``name``, quantize it with ``method`` at ``spec`` and evaluate it: perplexity, ``quantize`` time,
    peak memory relative to the float model, bits per quantized weight."""
    lm = load_model(name)
    bos = default_bos(lm)
    proto = fitting_protocol(lm.model, a.tokens, bos=bos)
    plan = plan_for(spec, method)
    calib = None
    if plan.needs_data:
        calib = calibration_set(lm.kind, lm.tokenizer, a.calib_samples, a.calib_len, seed=0, bos=bos)
    float_bytes = model_size(lm.model).total_bytes
    release_free_memory()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        quantize(lm.model, plan, calib, progress=False)
        seconds = time.perf_counter() - t0
    with cached_weights(lm.model):
        ppl = perplexity(lm.model, lm.tokenizer, proto, progress=False).ppl
    return {"ppl": ppl, "seconds": seconds, "peak_x": (float_bytes + max(0, mem.peak - mem.start)) / float_bytes,
            "bits": model_size(lm.model).bits_per_quantized_weight}


def _emit(a: argparse.Namespace, row: dict) -> dict:
    row["run"] = a.run
    return emit(a.json, row, _line(row))


def _header() -> str:
    return (f"{'model':14s} {'scheme':16s} {'method':9s} {'bits/w':>6s} {'ppl':>9s} {'vs float':>8s} "
            f"{'quant s':>8s} {'peak x':>6s}")


def _line(r: dict) -> str:
    bits = f"{r['bits']:6.3f}" if "bits" in r else f"{32:6d}"
    return (f"{r['model']:14s} {r['scheme']:16s} {r['method']:9s} {bits} {r['ppl']:9.3f} {r['vs_float']:7.3f}x "
            f"{r['seconds']:8.1f} {r['peak_x']:6.2f}")


if __name__ == "__main__":
    main()

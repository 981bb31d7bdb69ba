"""Activations, KV cache and rotations on language models: perplexity, time and memory by recipe.

One table, every row measured in this run, by the same protocol as ``benchmarks/llm_quality.py`` (bundled
Wikipedia text, first ``--tokens`` tokens in 1024-token windows; calibration ``--calib-samples`` x
``--calib-len`` tokens of the bundled news text, seed 0; each quantized row in a fresh process). Rows:

=================  ===============================================================================
float              the model as loaded
W8A8               int8 per-channel weights, int8 dynamic per-token activations: RTN, SmoothQuant
W4A8 g128          int4 group-128 weights, int8 per-token activations: RTN, rotation + GPTQ
W4A4, W4A4KV4      int4 per-channel weights, int4 per-token activations (and keys/values int4 per head and
                   token): RTN, SmoothQuant, rotation + RTN, rotation + GPTQ
W4A4 ... clip      rotation + GPTQ with the activation range clipped to 0.9 per token (KV: 0.95), as QuaRot
W3 g64, W2 g64     weight-only, GPTQ (true-sequential, damping 0.1) without and with the rotation first
KV int8 / int4     the float model with only its KV cache quantized (int4: asymmetric; also rotated)
=================  ===============================================================================

"rotation" is the ``rotate`` transform (QuaRot layout: randomized Hadamard on the residual stream, online
Hadamards on o_proj and down_proj inputs) where the architecture allows it, else ``rotate_inputs`` (an
online Hadamard on every block linear's input: Gemma-3, whose sandwich norms a rotated stream cannot pass);
KV4 after a rotation also rotates each head's keys and values. A W4A4 row and its W4A4KV4 twin come from one
quantization (the KV cache is quantized at run time), so they share time and memory. Every block linear is
quantized; ``lm_head`` and the embeddings stay float.

Rows whose layers run on integer kernels (W8A8, W4A8: ``lowbit.kernels``) also get a decode speed: batch 1,
greedy, ``--decode-tokens`` new tokens after a 128-token prompt, in the row's own process, against the float
model decoding the same prompt in the same run (the float row). The other rows are simulated (their layers
run lowbit's reference path) and have no speed to report.

    python benchmarks/llm_activations.py --json out.jsonl                 # both models, every row
    python benchmarks/llm_activations.py --json out.jsonl --resume        # continue an interrupted run
    python benchmarks/llm_activations.py --models smollm2-135m --rows w8a8-rtn kv8

With ``--resume`` the rows already in the ``--json`` file are kept, if they were measured by the same
committed code and settings (``rows.run_key``).
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

from lowbit.data import calibration_set, token_windows, wikipedia_text
from lowbit.evaluation import fitting_protocol, model_size, perplexity
from lowbit.evaluation.speed import decode_speed
from lowbit.kernels import use_kernels
from lowbit.memory import PeakRSS, release_free_memory
from lowbit.models import default_bos, load_model
from lowbit.models.arch import family_of
from lowbit.nn import cached_weights
from lowbit.nn.kv_cache import attach_kv_quant, detach_kv_quant
from lowbit.plan import QuantPlan
from lowbit.spec import KVCacheQuant
from rows import cpu_name, emit, previous_rows, row_in_new_process, run_key

GPTQ_SEQ = {"name": "gptq", "true_sequential": True, "percdamp": 0.1}
KV4 = "int4-token-asym"
ROW_KEY = ("model", "row")  # what identifies a row of the --json file (for --resume)
PROMPT_TOKENS = 128


def _row(weight, act=None, method="rtn", transforms=(), kv=None, kv_twin=None, clip=1.0):
    return {"weight": weight, "act": act, "method": method, "transforms": list(transforms), "kv": kv,
            "kv_twin": kv_twin, "clip": clip}


# id -> (label, settings); "rot" is resolved per model (rotate or rotate_inputs); kv_twin: also measured with
# that KV-cache format, as the row "<id>+kv4"
ROWS = {
    "w8a8-rtn": ("W8A8 RTN", _row("int8", "int8-token")),
    "w8a8-sq": ("W8A8 SmoothQuant", _row("int8", "int8-token", transforms=["smoothquant"])),
    "w4a8-rtn": ("W4A8 g128 RTN", _row("int4-g128-asym", "int8-token")),
    "w4a8-rot-gptq": ("W4A8 g128 rot+GPTQ", _row("int4-g128-asym", "int8-token", "gptq", ["rot"])),
    "w4a4-rtn": ("W4A4 RTN", _row("int4-ch-asym", "int4-token-asym", kv_twin=KV4)),
    "w4a4-sq": ("W4A4 SmoothQuant", _row("int4-ch-asym", "int4-token-asym", transforms=["smoothquant"],
                                         kv_twin=KV4)),
    "w4a4-rot-rtn": ("W4A4 rot+RTN", _row("int4-ch-asym", "int4-token-asym", transforms=["rot"], kv_twin=KV4)),
    "w4a4-rot-gptq": ("W4A4 rot+GPTQ", _row("int4-ch-asym", "int4-token-asym", "gptq", ["rot"], kv_twin=KV4)),
    "w4a4-rot-gptq-clip": ("W4A4 rot+GPTQ clip", _row("int4-ch-asym", "int4-token-asym", "gptq", ["rot"],
                                                      kv_twin={"spec": KV4, "clip": 0.95}, clip=0.9)),
    "w3-gptq": ("W3 g64 GPTQ", _row("int3-g64-asym", method=GPTQ_SEQ)),
    "w3-rot-gptq": ("W3 g64 rot+GPTQ", _row("int3-g64-asym", method=GPTQ_SEQ, transforms=["rot"])),
    "w2-gptq": ("W2 g64 GPTQ", _row("int2-g64-asym", method=GPTQ_SEQ)),
    "w2-rot-gptq": ("W2 g64 rot+GPTQ", _row("int2-g64-asym", method=GPTQ_SEQ, transforms=["rot"])),
    "kv8": ("KV int8", _row(None, kv="int8-token")),
    "kv4": ("KV int4", _row(None, kv=KV4)),
    "kv4-rot": ("KV int4 rotated", _row(None, kv={"spec": KV4, "rotate": True})),
}


def rotation_for(model) -> str:
    """``rotate`` where the family's residual stream can be rotated, else ``rotate_inputs``."""
    _, family = family_of(model)
    return "rotate" if family.no_residual_rotation is None else "rotate_inputs"


def plan_for(row: dict, model) -> QuantPlan:
    transforms = [rotation_for(model) if t == "rot" else t for t in row["transforms"]]
    kv = row["kv"]
    if kv is not None and "rot" in row["transforms"] and isinstance(kv, str):
        kv = {"spec": kv, "rotate": True}
    weight = row["weight"]
    rule = {"pattern": "*", "weight": weight, "method": row["method"]} if weight else {"pattern": "*", "weight": None}
    if weight and row["act"]:
        rule["act"] = {"spec": row["act"], "dynamic": True}
        if row.get("clip", 1.0) != 1.0:
            rule["act"]["clip"] = row["clip"]
    return QuantPlan.from_dict({"rules": [rule], "transforms": transforms, "kv": kv})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--tokens", type=int, default=16384, help="evaluation token budget")
    p.add_argument("--calib-samples", type=int, default=128)
    p.add_argument("--calib-len", type=int, default=512)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--decode-tokens", type=int, default=128, help="new tokens of the decode speed (0: none)")
    p.add_argument("--json", default=None, help="append one JSON line per row to this file")
    p.add_argument("--resume", action="store_true", help="keep the rows already in --json (same code and settings)")
    p.add_argument("--row", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    p.add_argument("--row-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.resume and not a.json:
        p.error("--resume needs --json FILE")
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.row:
        Path(a.row_out).write_text(json.dumps(measure_row(*a.row, a)), encoding="utf-8")
        return
    a.run = {**run_key(__file__, a), "decode_tokens": a.decode_tokens}
    a.done = previous_rows(a.json, a.run, ROW_KEY) if a.resume else {}
    print(f"calibration: {a.calib_samples} x {a.calib_len} tokens of news text, seed 0; {a.threads} threads; "
          f"code {a.run['code']}; torch {torch.__version__}; CPU {cpu_name()}"
          + (f"; {len(a.done)} row(s) from {a.json}" if a.done else ""))
    print(_header(), flush=True)
    rows = []
    for name in a.models:
        rows += run_model(name, a)
    print("\nall rows:")
    print(_header())
    for r in rows:
        print(_line(r))


def run_model(name: str, a: argparse.Namespace) -> list[dict]:
    base = a.done.get((name, "float"))
    if base is None:
        lm = load_model(name)
        proto = fitting_protocol(lm.model, a.tokens, bos=default_bos(lm))
        print(f"# {lm.name}: {proto.describe()}; rotation: {rotation_for(lm.model)}", flush=True)
        base = _emit(a, {"model": name, "row": "float", "label": "float",
                         "ppl": perplexity(lm.model, lm.tokenizer, proto, progress=False).ppl, "vs_float": 1.0,
                         "seconds": 0.0, "peak_x": 1.0, "plan": None, "decode_tok_s": _decode(lm, a)})
        del lm
    else:
        print(_line(base), flush=True)
    rows = [base]
    for rid in a.rows:
        keys = [rid] + ([rid + "+kv4"] if ROWS[rid][1]["kv_twin"] else [])
        if all((name, k) in a.done for k in keys):
            for k in keys:
                rows.append(a.done[(name, k)])
                print(_line(rows[-1]), flush=True)
            continue
        r = row_in_new_process(__file__, [name, rid], a, ["--decode-tokens", str(a.decode_tokens)])
        for key, ppl in r["ppl"].items():
            label = ROWS[rid][0] + (" KV4" if key != "main" else "")
            tok_s = r.get("decode_tok_s") if key == "main" else None
            rows.append(_emit(a, {"model": name, "row": rid + ("+kv4" if key != "main" else ""), "label": label,
                                  "ppl": ppl, "vs_float": ppl / base["ppl"], "seconds": r["seconds"],
                                  "peak_x": r["peak_x"], "plan": r["plan"] if key == "main" else r["plan_kv"],
                                  "decode_tok_s": tok_s, "decode_vs_float": _ratio(tok_s, base["decode_tok_s"]),
                                  "kernels": r.get("kernels") if key == "main" else None}))
    return rows


def _decode(lm, a: argparse.Namespace) -> float | None:
    """Greedy batch-1 decode tokens/s of ``lm.model`` as it is (None with ``--decode-tokens 0``)."""
    if a.decode_tokens <= 0:
        return None
    prompt = token_windows(lm.tokenizer, wikipedia_text(), PROMPT_TOKENS, max_tokens=PROMPT_TOKENS)[:1]
    return decode_speed(lm.model, prompt, a.decode_tokens).decode_tokens_per_s


def _ratio(x: float | None, base: float | None) -> float | None:
    return None if x is None or not base else x / base


def measure_row(name: str, rid: str, a: argparse.Namespace) -> dict:
    """Quantize ``name`` by row ``rid`` and evaluate it (and its KV4 twin): perplexity, time, peak memory."""
    from lowbit.quantizer import quantize

    row = ROWS[rid][1]
    lm = load_model(name)
    bos = default_bos(lm)
    proto = fitting_protocol(lm.model, a.tokens, bos=bos)
    plan = plan_for(row, lm.model)
    calib = None
    if plan.needs_data:
        calib = calibration_set(lm.kind, lm.tokenizer, a.calib_samples, a.calib_len, seed=0, bos=bos)
    float_bytes = model_size(lm.model).total_bytes
    release_free_memory()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        quantize(lm.model, plan, calib, progress=False)
        seconds = time.perf_counter() - t0
    out = {"seconds": seconds, "peak_x": (float_bytes + max(0, mem.peak - mem.start)) / float_bytes,
           "plan": plan.to_dict(), "ppl": {}}
    with cached_weights(lm.model):
        out["ppl"]["main"] = perplexity(lm.model, lm.tokenizer, proto, progress=False).ppl
        if row["kv_twin"]:
            twin = row["kv_twin"] if isinstance(row["kv_twin"], dict) else {"spec": row["kv_twin"]}
            kv = KVCacheQuant.from_dict({**twin, "rotate": "rot" in row["transforms"]})
            attach_kv_quant(lm.model, kv)
            out["plan_kv"] = {**plan.to_dict(), "kv": kv.to_dict()}
            out["ppl"]["kv"] = perplexity(lm.model, lm.tokenizer, proto, progress=False).ppl
            detach_kv_quant(lm.model)
    report = use_kernels(lm.model)
    out["kernels"] = report.counts()
    if any(k != "reference" for k in out["kernels"]):  # integer kernels run this row: measure its speed too
        out["decode_tok_s"] = _decode(lm, a)
    return out


def _emit(a: argparse.Namespace, row: dict) -> dict:
    row["run"] = a.run
    return emit(a.json, row, _line(row))


def _header() -> str:
    return (f"{'model':14s} {'row':24s} {'ppl':>9s} {'vs float':>8s} {'quant s':>8s} {'peak x':>6s} "
            f"{'tok/s':>7s} {'vs fp32':>7s}")


def _line(r: dict) -> str:
    tok_s, vs = r.get("decode_tok_s"), r.get("decode_vs_float")
    speed = f"{tok_s:7.1f} " + (f"{vs:6.2f}x" if vs else f"{'':7s}") if tok_s else f"{'-':>7s} {'-':>7s}"
    return (f"{r['model']:14s} {r['label']:24s} {r['ppl']:9.3f} {r['vs_float']:7.3f}x {r['seconds']:8.1f} "
            f"{r['peak_x']:6.2f} {speed}")


if __name__ == "__main__":
    main()

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

    python benchmarks/llm_activations.py --json out.jsonl                 # both models, every row
    python benchmarks/llm_activations.py --models smollm2-135m --rows w8a8-rtn kv8
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
from lowbit.memory import PeakRSS, release_free_memory
from lowbit.models import default_bos, load_model
from lowbit.models.arch import family_of
from lowbit.nn import cached_weights
from lowbit.nn.kv_cache import attach_kv_quant
from lowbit.plan import QuantPlan
from lowbit.spec import KVCacheQuant
from rows import code_version, cpu_name, emit, row_in_new_process

GPTQ_SEQ = {"name": "gptq", "true_sequential": True, "percdamp": 0.1}
KV4 = "int4-token-asym"


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
    p.add_argument("--json", default=None, help="append one JSON line per row to this file")
    p.add_argument("--row", nargs=2, metavar=("MODEL", "ROW"), help=argparse.SUPPRESS)
    p.add_argument("--row-out", help=argparse.SUPPRESS)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if a.row:
        Path(a.row_out).write_text(json.dumps(measure_row(*a.row, a)), encoding="utf-8")
        return
    a.code = code_version(__file__)
    print(f"calibration: {a.calib_samples} x {a.calib_len} tokens of news text, seed 0; {a.threads} threads; "
          f"code {a.code}; torch {torch.__version__}; CPU {cpu_name()}")
    print(_header(), flush=True)
    rows = []
    for name in a.models:
        rows += run_model(name, a)
    print("\nall rows:")
    print(_header())
    for r in rows:
        print(_line(r))


def run_model(name: str, a: argparse.Namespace) -> list[dict]:
    lm = load_model(name)
    proto = fitting_protocol(lm.model, a.tokens, bos=default_bos(lm))
    print(f"# {lm.name}: {proto.describe()}; rotation: {rotation_for(lm.model)}", flush=True)
    base = perplexity(lm.model, lm.tokenizer, proto, progress=False).ppl
    rows = [_emit(a, {"model": name, "row": "float", "label": "float", "ppl": base, "vs_float": 1.0,
                      "seconds": 0.0, "peak_x": 1.0, "plan": None})]
    del lm
    for rid in a.rows:
        r = row_in_new_process(__file__, [name, rid], a)
        for key, ppl in r["ppl"].items():
            label = ROWS[rid][0] + (" KV4" if key != "main" else "")
            rows.append(_emit(a, {"model": name, "row": rid + ("+kv4" if key != "main" else ""), "label": label,
                                  "ppl": ppl, "vs_float": ppl / base, "seconds": r["seconds"],
                                  "peak_x": r["peak_x"], "plan": r["plan"] if key == "main" else r["plan_kv"]}))
    return rows


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
    return out


def _emit(a: argparse.Namespace, row: dict) -> dict:
    row["code"] = a.code
    return emit(a.json, row, _line(row))


def _header() -> str:
    return f"{'model':14s} {'row':24s} {'ppl':>9s} {'vs float':>8s} {'quant s':>8s} {'peak x':>6s}"


def _line(r: dict) -> str:
    return (f"{r['model']:14s} {r['label']:24s} {r['ppl']:9.3f} {r['vs_float']:7.3f}x {r['seconds']:8.1f} "
            f"{r['peak_x']:6.2f}")


if __name__ == "__main__":
    main()

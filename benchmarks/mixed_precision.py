"""Mixed precision: the search's allocations at several budgets against uniform formats, in one run.

    python benchmarks/mixed_precision.py [--models smollm2-135m,gemma3-270m,efficientnet-lite0] [--no-correlate]

Per model, each step in a fresh process:

1. ``lowbit.mixed.search`` with the model's candidate formats and algorithm (sensitivity ``fisher``, the default),
   on calibration data of its own (language models: 32 x 512 tokens of the bundled news text, seed 1, the last 2
   windows held out; EfficientNet-Lite0: 64 photo crops, seed 1, the last 16 held out), timed;
2. every budget's allocation (:meth:`SearchResult.reallocate`), quantized block by block with the same algorithm
   and calibration as the uniform rows, and measured;
3. the uniform formats, quantized and measured the same way.

Quality: language models, perplexity on the README's protocol (the first 16,384 tokens of the bundled Wikipedia
text in 1,024-token windows; BOS for Gemma); EfficientNet-Lite0, top-1 agreement and KL with the float model over
the 220 photo views. Calibration for quantizing: 128 x 512 news tokens (seed 0) or 64 crops (seed 0). Bits per
weight are measured on the quantized model (``model_size``: codes, scales and zero points of the quantized layers).

Then, unless ``--no-correlate``, a second search on SmolLM2 (two formats) and EfficientNet-Lite0 (all four) also
measures the sensitivities ``proxy``, ``hutchinson`` and the direct ``kl``, and prints each cheap one's Spearman
rank correlation with ``kl`` over every (layer group, format).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

LM = {"calib": (128, 512), "search_calib": (32, 512), "heldout": 2, "method": "gptq", "calib_dtype": "bfloat16"}
MODELS = {
    "smollm2-135m": {**LM, "formats": ["int2-g64-asym", "int3-g64-asym", "int3-g128-asym", "int4-g64-asym",
                                       "int4-g128-asym", "int8"],
                     "budgets": [3.0, 3.5, 4.0], "uniform": ["int3-g64-asym", "int4-g128-asym"],
                     "corr_formats": ["int3-g64-asym", "int4-g64-asym"]},
    "gemma3-270m": {**LM, "formats": ["int2-g64-asym", "int3-g64-asym", "int3-g128-asym", "int4-g64-asym",
                                      "int4-g128-asym", "int8"],
                    "budgets": [3.5], "uniform": ["int4-g128-asym"], "corr_formats": None},
    "efficientnet-lite0": {"calib": (64, None), "search_calib": (64, None), "heldout": 16, "method": "rtn",
                           "calib_dtype": "float32", "formats": ["int4", "int5", "int6", "int8"], "budgets": [5.0],
                           "uniform": ["int6"], "corr_formats": ["int4", "int5", "int6", "int8"]},
    # a quick check of this script: python benchmarks/mixed_precision.py --models tiny-llama
    "tiny-llama": {**LM, "calib": (8, 64), "search_calib": (12, 64), "calib_dtype": "float32",
                   "formats": ["int2-g32-asym", "int4-g32-asym", "int8"], "budgets": [4.0],
                   "uniform": ["int4-g32-asym"],
                   "corr_formats": ["int2-g32-asym", "int4-g32-asym"]},
}

WORKER = r"""
import json, math, sys, time, torch
torch.set_num_threads(2)
from lowbit import QuantPlan, load_model, quantize
from lowbit.mixed.search import SearchResult, search
from lowbit.nn.size import model_size
job = json.loads(sys.argv[1])
cfg = job["cfg"]
lm = load_model(job["model"])
lm_kind = lm.kind == "causal-lm"
bos = "gemma" in job["model"]

def data(n, length, seed):
    from lowbit.data import calibration_set
    if lm_kind:
        return calibration_set("causal-lm", lm.tokenizer, n, length, seed=seed, bos=bos)
    from lowbit.data import calibration_views
    return calibration_views(n, seed=seed)

if job["step"] == "search":
    n, length = cfg["search_calib"]
    formats = job.get("formats") or cfg["formats"]
    t0 = time.perf_counter()
    r = search(lm.model, data(n, length, 1), formats, "%gbpw" % job["budget"], method=cfg["method"],
               measures=job.get("measures", []), heldout=cfg["heldout"], progress=False)
    with open(job["record"], "w", encoding="utf-8") as f:
        f.write(r.to_json())
    print(json.dumps({"seconds": r.seconds, "total": time.perf_counter() - t0}))
    sys.exit(0)

if job["step"] == "mixed":
    rec = SearchResult.from_dict(json.loads(open(job["record"]).read())).reallocate("%gbpw" % job["budget"])
    plan = rec.plan()
    label = "search %g bpw" % job["budget"]
else:
    plan = QuantPlan.uniform(job["format"], cfg["method"])
    label = "uniform " + job["format"]
n, length = cfg["calib"]
t0 = time.perf_counter()
quantize(lm.model, plan, data(n, length, 0), progress=False, calib_dtype=cfg["calib_dtype"])
seconds = time.perf_counter() - t0
row = {"label": label, "bpw": model_size(lm.model).bits_per_quantized_weight, "quantize_s": seconds}
if lm_kind:
    from lowbit.data import token_windows, wikipedia_text
    from lowbit.evaluation.perplexity import windows_nll
    total, count, _ = windows_nll(lm.model, token_windows(lm.tokenizer, wikipedia_text(), 1024, 16384, bos=bos),
                                  progress=False)
    row["ppl"] = math.exp(total / count)
else:
    from lowbit.data import imagenet_views
    from lowbit.evaluation import agreement_from_logits, classifier_logits
    views = imagenet_views()
    ref = load_model(job["model"]).model
    r = agreement_from_logits(classifier_logits(ref, views, progress=False),
                              classifier_logits(lm.model, views, progress=False))
    row.update(top1=r.top1, kl=r.kl)
if job["step"] == "mixed":
    row["predicted"] = rec.predicted
print(json.dumps(row))
"""


def run(job: dict) -> dict:
    done = subprocess.run([sys.executable, "-c", WORKER, json.dumps(job)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{job['model']} {job['step']} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="smollm2-135m,gemma3-270m,efficientnet-lite0")
    p.add_argument("--no-correlate", action="store_true")
    a = p.parse_args()

    from lowbit.bench import machine_line
    from lowbit.mixed.report import correlations
    from lowbit.mixed.search import SearchResult

    print(machine_line())
    work = Path(tempfile.mkdtemp(prefix="lowbit-mixed-"))
    for model in a.models.split(","):
        cfg = MODELS[model]
        print(f"\n## {model}: {cfg['method']}, candidates {', '.join(cfg['formats'])}", flush=True)
        record = work / f"{model}.json"
        s = run({"model": model, "cfg": cfg, "step": "search", "record": str(record), "budget": cfg["budgets"][0]})
        stages = ", ".join(f"{k} {v:.0f} s" for k, v in s["seconds"].items() if k != "total")
        print(f"search (sensitivity fisher): {s['seconds']['total']:.0f} s ({stages})", flush=True)
        rec = SearchResult.from_dict(json.loads(record.read_text()))
        lm = "ppl" if cfg["calib"][1] else "top1"
        head = f"{'plan':24} {'bits/weight':>11} {'perplexity' if lm == 'ppl' else 'top-1 agr.':>10} " \
               f"{'' if lm == 'ppl' else 'KL':>8} {'predicted':>10} {'quantize s':>10}"
        print(head, flush=True)
        jobs = [{"model": model, "cfg": cfg, "step": "mixed", "record": str(record), "budget": b}
                for b in cfg["budgets"]] + [{"model": model, "cfg": cfg, "step": "uniform", "format": f}
                                           for f in cfg["uniform"]]
        for job in jobs:
            r = run(job)
            quality = f"{r['ppl']:10.3f} {'':>8}" if lm == "ppl" else f"{r['top1']:10.2%} {r['kl']:8.4f}"
            if "predicted" not in r and r["label"].removeprefix("uniform ") in rec.specs:  # its predicted error
                k = rec.specs.index(r["label"].removeprefix("uniform "))
                r["predicted"] = sum(c[k] for c in rec.cost)
            pred = f"{r['predicted']:10.4g}" if "predicted" in r else f"{'':>10}"
            print(f"{r['label']:24} {r['bpw']:11.3f} {quality} {pred} {r['quantize_s']:10.0f}", flush=True)
        if cfg["corr_formats"] and not a.no_correlate:
            corr = work / f"{model}-corr.json"
            c = run({"model": model, "cfg": cfg, "step": "search", "record": str(corr), "budget": 16,
                     "formats": cfg["corr_formats"], "measures": ["proxy", "hutchinson", "kl"]})
            rho = correlations(SearchResult.from_dict(json.loads(corr.read_text())))
            print(f"Spearman with the direct KL ({', '.join(cfg['corr_formats'])}; measured in "
                  f"{c['seconds']['total']:.0f} s): " + ", ".join(f"{k} {v:.3f}" for k, v in rho.items()), flush=True)


if __name__ == "__main__":
    main()

"""Quantization of model families beyond decoder LLMs, on real pretrained models, in one table.

Rows: a bundled model x a plan (format and algorithm). Columns: family, model, row, the quality measures
against the float model (for a text encoder, lowbit.evaluation.embeddings: sentence-embedding cosine and
retrieval agreement over 512 Wikipedia sentences), artifact size against the float source's weight files,
quantize time, peak memory (the float model plus the resident memory quantization added, as a multiple of
the float model's size). Every row runs in a fresh process (benchmarks/rows.py), all in the same code version.

    .venv/bin/python benchmarks/architectures.py                 # all rows, 2 threads
    .venv/bin/python benchmarks/architectures.py --rows w8a8 w4-gptq

Only all-MiniLM-L6-v2 (BERT encoder) is a real pretrained non-decoder model that installs offline here
(shared/ASSETS.md); the tiny random families of lowbit.models.tiny are covered by the test suite
(tests/models/test_any_architecture.py), not measured here.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from rows import code_version, cpu_name, emit, row_in_new_process  # noqa: E402

from lowbit import QuantPlan, save  # noqa: E402
from lowbit.data import calibration_set  # noqa: E402
from lowbit.evaluation import encoder_agreement, model_size  # noqa: E402
from lowbit.io.manifest import artifact_size  # noqa: E402
from lowbit.memory import PeakRSS, release_free_memory  # noqa: E402
from lowbit.models import load_model  # noqa: E402
from lowbit.models.registry import BUNDLED_MODELS  # noqa: E402
from lowbit.nn.cache import cached_weights  # noqa: E402

W8A8 = {"spec": "int8-token", "dynamic": True}
# id -> (label, plan)
ROWS = {
    "w8a8": ("W8A8 RTN", lambda: QuantPlan.uniform("int8", act=W8A8)),
    "w8": ("W8 RTN", lambda: QuantPlan.uniform("int8")),
    "w4-rtn": ("W4 g128 RTN", lambda: QuantPlan.uniform("int4-g128-asym")),
    "w4-gptq": ("W4 g128 GPTQ", lambda: QuantPlan.uniform("int4-g128-asym", method="gptq")),
    "w4-awq": ("W4 g128 AWQ", lambda: QuantPlan.uniform("int4-g128-asym", method="awq")),
}
MODELS = {"minilm-l6": "text encoder (BERT)"}


def measure_row(name: str, rid: str, a: argparse.Namespace) -> dict:
    """Quantize ``name`` by row ``rid``: agreement with its float model, artifact size, time, peak memory."""
    import copy

    from lowbit.quantizer import quantize

    ref = load_model(name)
    model = copy.deepcopy(ref.model)
    plan = ROWS[rid][1]()
    calib = calibration_set(ref.kind, ref.tokenizer, a.calib_samples, a.calib_len) if plan.needs_data else None
    float_bytes = model_size(ref.model).total_bytes
    release_free_memory()
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        quantize(model, plan, calib, progress=False)
        seconds = time.perf_counter() - t0
    with cached_weights(model):
        r = encoder_agreement(ref.model, model, ref.tokenizer)
    with tempfile.TemporaryDirectory() as tmp:
        size = artifact_size(save(model, Path(tmp) / "a", source=ref.source, plan=plan))
    folder = BUNDLED_MODELS[name].folder()
    source = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    return {"seconds": seconds, "peak_x": (float_bytes + max(0, mem.peak - mem.start)) / float_bytes,
            "cosine": r.cosine_mean, "cosine_min": r.cosine_min, "top1": r.retrieval_top1,
            "recall10": r.recall_at_10, "bytes": size, "source_bytes": source, "plan": plan.to_dict()}


def _header() -> str:
    return (f"{'family':20s} {'model':10s} {'row':14s} {'cosine':>8s} {'min':>8s} {'top-1':>7s} {'R@10':>7s} "
            f"{'size x':>7s} {'quant s':>8s} {'peak x':>6s}")


def _line(r: dict) -> str:
    return (f"{r['family']:20s} {r['model']:10s} {r['label']:14s} {r['cosine']:8.5f} {r['cosine_min']:8.5f} "
            f"{100 * r['top1']:6.2f}% {100 * r['recall10']:6.2f}% {r['bytes'] / r['source_bytes']:7.3f} "
            f"{r['seconds']:8.1f} {r['peak_x']:6.2f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    p.add_argument("--tokens", type=int, default=0, help=argparse.SUPPRESS)  # rows.py passes it on
    p.add_argument("--calib-samples", type=int, default=128, help="calibration text windows")
    p.add_argument("--calib-len", type=int, default=128, help="tokens per calibration window")
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
    code = code_version(__file__)
    print(f"# code {code}; torch {torch.__version__}; {a.threads} threads; CPU {cpu_name()}; "
          f"calibration {a.calib_samples} x {a.calib_len} tokens of news text (data-aware rows); agreement over "
          f"512 Wikipedia sentences, mean-pooled embeddings")
    print(_header())
    for name in a.models:
        for rid in a.rows:
            r = row_in_new_process(__file__, [name, rid], a)
            r.update(family=MODELS[name], model=name, row=rid, label=ROWS[rid][0], code=code)
            emit(a.json, r, _line(r))


if __name__ == "__main__":
    main()

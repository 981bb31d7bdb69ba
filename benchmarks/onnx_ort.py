"""lowbit's QDQ ONNX files in onnxruntime: agreement with lowbit's own output, and speed against float ONNX.

    python benchmarks/onnx_ort.py [--tokens 16384] [--threads 2] [--skip-lm] [--skip-vision]

One run, each model exported by ``lowbit.export.onnx.export_onnx`` (the export itself checks onnxruntime
against lowbit on a few inputs and refuses to write a file that disagrees):

* SmolLM2-135M, float and lowbit's ``int4`` decode format of ``lowbit bench`` (every linear including
  ``lm_head`` int4-g64-asym by round to nearest, embedding int8 per row). Perplexity on the protocol of
  ``lowbit eval`` (bundled Wikipedia text, 1,024-token non-overlapping windows, no BOS), the same token ids
  through lowbit (reference path) and through onnxruntime, both in its exact session (float activations
  into its 4-bit ``MatMulNBits`` kernel) and its default one (which quantizes activations to int8 there);
  onnxruntime's time for a 128-token prefill at batch 1 (the graph has no key/value cache, so no decode).
* EfficientNet-Lite0, float and W8A8 (the vision format of ``lowbit bench``: every conv and the classifier
  int8 per channel, static per-tensor int8 activations calibrated on 64 crops of the bundled calibration
  photos). Top-1 agreement of onnxruntime with lowbit's int8 model and with the float model over the 220
  bundled evaluation views; images/s at batch 8 in onnxruntime and in lowbit (kernels on).
"""

from __future__ import annotations

import argparse
import logging
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def ort_ppl(session, windows: torch.Tensor) -> float:
    total, n = 0.0, 0
    for row in windows:
        logits = torch.from_numpy(session.run(None, {"input_ids": row[None].numpy()})[0][0]).double()
        total += float(torch.nn.functional.cross_entropy(logits[:-1], row[1:], reduction="sum"))
        n += row.numel() - 1
    return math.exp(total / n)


def ort_seconds(session, name: str, x: np.ndarray, min_time: float = 1.0) -> float:
    from lowbit.evaluation.speed import median_time

    return median_time(lambda: session.run(None, {name: x}), min_time=min_time)


def lm_rows(a: argparse.Namespace, tmp: Path) -> list[dict]:
    from lowbit.bench import LM_FORMATS, lm_plan
    from lowbit.data.text import corpus_text, token_windows
    from lowbit.evaluation.perplexity import windows_nll
    from lowbit.export.onnx import default_inputs, export_onnx, onnxruntime_session
    from lowbit.models import load_model
    from lowbit.nn import cached_weights
    from lowbit.quantizer import quantize

    rows = []
    for fmt in ("fp32", "int4"):
        lm = load_model("smollm2-135m")
        if fmt != "fp32":
            quantize(lm.model, lm_plan(LM_FORMATS[fmt]), progress=False)
        windows = token_windows(lm.tokenizer, corpus_text("wikipedia"), 1024, a.tokens)
        with cached_weights(lm.model):
            total, n, _ = windows_nll(lm.model, windows, progress=False)
        example, check, _ = default_inputs(lm.model, lm.tokenizer)
        t0 = time.perf_counter()
        report = export_onnx(lm.model, tmp / f"smollm2-{fmt}.onnx", example, kind="causal-lm", check=check)
        export_s = time.perf_counter() - t0
        del lm
        row = {"format": fmt, "MB": report.bytes / 1e6, "export_s": export_s, "lowbit_ppl": math.exp(total / n),
               "check": report.describe()}
        for exact in (True, False):
            s = onnxruntime_session(report.path, exact=exact, threads=a.threads)
            row["ort_ppl" if exact else "ort_default_ppl"] = ort_ppl(s, windows)
            if exact:
                row["prefill_ms"] = 1e3 * ort_seconds(s, "input_ids", windows[:1, :128].numpy())
            del s
        rows.append(row)
        print(_lm_line(row), flush=True)
    return rows


def vision_rows(a: argparse.Namespace, tmp: Path) -> list[dict]:
    from lowbit.bench import vision_plan
    from lowbit.data import calibration_views
    from lowbit.data.images import imagenet_views
    from lowbit.evaluation.speed import images_per_second
    from lowbit.export.onnx import default_inputs, export_onnx, onnxruntime_session
    from lowbit.kernels import use_kernels
    from lowbit.models import load_model
    from lowbit.quantizer import quantize

    views = imagenet_views()
    float_model = load_model("efficientnet-lite0").model
    with torch.inference_mode():
        float_top1 = torch.cat([float_model(v) for v in views.split(20)]).argmax(-1)
    x8 = torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(0)).numpy()
    rows = []
    for fmt in ("fp32", "int8"):
        model = load_model("efficientnet-lite0").model
        if fmt == "int8":
            quantize(model, vision_plan(), list(calibration_views(64).split(8)), progress=False)
        with torch.inference_mode():
            own_top1 = torch.cat([model(v) for v in views.split(20)]).argmax(-1)
        example, check, _ = default_inputs(model)
        report = export_onnx(model, tmp / f"effnet-{fmt}.onnx", example, kind="image-classifier", check=check)
        s = onnxruntime_session(report.path, exact=False, threads=a.threads)
        ort_top1 = torch.from_numpy(np.concatenate([s.run(None, {"pixel_values": v.numpy()})[0]
                                                    for v in views.split(20)])).argmax(-1)
        ort_ips = 8 / ort_seconds(s, "pixel_values", x8)
        use_kernels(model, keep_reference=False)
        own_ips = images_per_second(model, 8)
        row = {"format": fmt, "MB": report.bytes / 1e6, "agree_lowbit": float((ort_top1 == own_top1).float().mean()),
               "agree_float": float((ort_top1 == float_top1).float().mean()), "ort_ips": ort_ips,
               "lowbit_ips": own_ips, "check": report.describe()}
        rows.append(row)
        print(_vision_line(row), flush=True)
    return rows


def _lm_line(r: dict) -> str:
    return (f"{r['format']:6s} {r['MB']:7.1f} {r['lowbit_ppl']:10.3f} {r['ort_ppl']:9.3f} {r['ort_default_ppl']:12.3f} "
            f"{r['prefill_ms']:11.1f} {r['export_s']:8.1f}")


def _vision_line(r: dict) -> str:
    return (f"{r['format']:6s} {r['MB']:6.1f} {r['agree_lowbit']:13.2%} {r['agree_float']:12.2%} "
            f"{r['ort_ips']:10.1f} {r['lowbit_ips']:11.1f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=16384, help="evaluation token budget (LM perplexity)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--skip-vision", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="lowbit-onnx-") as d:
        tmp = Path(d)
        lm, vision = [], []
        if not a.skip_lm:
            print(f"SmolLM2-135M, {a.tokens} Wikipedia tokens in 1024-token windows; {a.threads} threads")
            print("format      MB lowbit ppl   ORT ppl  ORT default  prefill ms export s", flush=True)
            lm = lm_rows(a, tmp)
        if not a.skip_vision:
            print("\nEfficientNet-Lite0, 220 bundled views; images/s at batch 8")
            print("format     MB  ORT=lowbit  ORT=float  ORT img/s lowbit img/s", flush=True)
            vision = vision_rows(a, tmp)
        print("\nexport checks:")
        for r in lm + vision:
            print(f"  {r['format']}: {r['check']}")
        for r in vision:
            if r["format"] == "int8":
                fp = next(v for v in vision if v["format"] == "fp32")
                print(f"\nEfficientNet int8 vs fp32: onnxruntime {r['ort_ips'] / fp['ort_ips']:.2f}x, "
                      f"lowbit {r['lowbit_ips'] / fp['lowbit_ips']:.2f}x")


if __name__ == "__main__":
    main()

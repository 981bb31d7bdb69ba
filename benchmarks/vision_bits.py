"""Weight-only quantization of an image classifier: agreement with the float model by bit width.

Prints one table: for 8, 6 and 4 bits, per-channel and per-tensor, round-to-nearest with and without
bias correction (and with MSE clip search), the top-1 / top-5 agreement and KL divergence against the
float model over the bundled photo views, and the real bits per weight.

Protocol: evaluation views = ``lowbit.data.imagenet_views()`` (11 photos x 20 deterministic crops and
flips = 220); calibration (bias correction only) = ``lowbit.data.calibration_views(64, seed=0)``, random
crops of other photos, disjoint from the evaluation photos. Every layer with weights is quantized
(convolutions and the classifier); BatchNorm stays float and unfolded.

    python benchmarks/vision_bits.py [--model efficientnet-lite0] [--bits 8 6 4]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from lowbit.data import calibration_views, imagenet_views
from lowbit.evaluation import agreement_from_logits, classifier_logits, model_size
from lowbit.models import load_model
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="efficientnet-lite0")
    p.add_argument("--bits", type=int, nargs="+", default=[8, 6, 4])
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)

    lm = load_model(a.model)
    views, calib = imagenet_views(), calibration_views(64, seed=0)
    ref = classifier_logits(lm.model, views, progress=False)
    print(f"model {lm.name}; {views.shape[0]} evaluation views; {calib.shape[0]} calibration views (disjoint photos)")
    print(f"{'scheme':14s} {'method':22s} {'bits/w':>7s} {'top-1':>8s} {'top-5':>8s} {'KL nats':>9s} {'time s':>7s}")
    variants = [("rtn", {}), ("rtn+bias-corr", {"bias_correction": True}),
                ("rtn+clip+bias-corr", {"method": {"name": "rtn", "clip_search": True}, "bias_correction": True})]
    for bits in a.bits:
        for gran in ("", "-tensor"):
            scheme = f"int{bits}{gran}"
            for label, kw in variants:
                if "clip" in label and bits == 8:
                    continue  # clipping cannot help where rounding error is already tiny
                model = copy.deepcopy(lm.model)
                t = time.perf_counter()
                quantize(model, QuantPlan.uniform(scheme, skip=(), **kw), calib if kw.get("bias_correction") else None,
                         progress=False)
                dt = time.perf_counter() - t
                r = agreement_from_logits(ref, classifier_logits(model, views, progress=False))
                bpw = model_size(model).bits_per_quantized_weight
                print(f"{scheme:14s} {label:22s} {bpw:7.3f} {100 * r.top1:7.2f}% {100 * r.top5:7.2f}% {r.kl:9.4f} "
                      f"{dt:7.1f}", flush=True)


if __name__ == "__main__":
    main()

"""Vision post-training quantization: quality by model, format and method, in one table.

Rows: a model, a format (weights and static per-tensor input activations of every convolution and linear) and
a method:

* ``rtn``: round to nearest, min/max ranges, activation ranges from the min/max observer (A8) or the MSE
  observer (A4);
* ``dfq``: DFQ (Nagel et al. 2019): BatchNorm folding, cross-layer equalization and high-bias absorption
  (``transforms: [equalize, absorb_bias]``), then round to nearest with empirical bias correction;
* ``adaround``: AdaRound on each layer's output error (``lowbit.algorithms.adaround``), after BatchNorm folding;
* ``brecq``: block reconstruction with QDrop (``lowbit.algorithms.brecq``, ``reconstruct: {iters: 500}``) from
  round to nearest, after BatchNorm folding. On EfficientNet-Lite0 ``{iters: 100, batch: 8}``: its 19 units, the
  first with 112 x 112 activations, take about 6 minutes so on 2 cores (BRECQ's paper uses 20,000 steps).

Formats: W8A8 (int8 per-channel weights), W8A8t (int8 per-*tensor* weights), W6A8, W4A8, W4A4, W2A4; in the
4- and 2-bit formats the first convolution and the classifier stay W8A8 (as in AdaRound, BRECQ and QDrop).
EfficientNet-Lite0 runs W8A8 and W4A8 (the formats its targets name): AdaRound there takes 10-13 minutes a row.

Quality: ``efficientnet-lite0``: top-1 agreement and KL with the float model over the 220 photo views
(``lowbit.data.imagenet_views``), calibrated on 64 views of other photos; ``fmnist-resnet`` / ``fmnist-vit``:
top-1 accuracy on the 10,000 Fashion-MNIST test images (and agreement), calibrated on 512 training images.
Columns also give the quantize time and the process's peak memory during quantization. ``--speed`` then
times the integer rows against fp32 in the same run (``benchmarks/int8_graph.py``: EfficientNet-Lite0 W8A8
through ``int8_conv_graph``, or W8A7 on a CPU without VNNI).

Each row runs in a fresh process and appends one JSON line to ``--json`` (``--resume`` skips rows already
there for the same code version), so the table is every row in one code version:

    python benchmarks/vision_quality.py --json results/vision_quality.jsonl [--models ...] [--formats ...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

MODELS = ("fmnist-resnet", "fmnist-vit", "efficientnet-lite0")
FORMATS = {  # name -> (weight, activation, activation observer)
    "W8A8": ("int8", "int8-tensor", "minmax"),
    "W8A8t": ("int8-tensor", "int8-tensor", "minmax"),
    "W6A8": ("int6", "int8-tensor", "minmax"),
    "W4A8": ("int4", "int8-tensor", "minmax"),
    "W4A4": ("int4", "int4-tensor", "mse"),
    "W2A4": ("int2", "int4-tensor", "mse"),
}
METHODS = ("rtn", "dfq", "adaround", "brecq")
BRECQ_ITERS = 500
BRECQ_SETTINGS = {"efficientnet-lite0": {"iters": 100, "batch": 8}}  # others: {"iters": BRECQ_ITERS}
MODEL_FORMATS = {"efficientnet-lite0": ("W8A8", "W4A8")}  # others: every format that applies
# the first convolution and the classifier: kept at W8A8 in the formats below 6 bits
ENDS = {"fmnist-resnet": ("stem.0", "fc"), "fmnist-vit": ("patch_embed", "head"),
        "efficientnet-lite0": ("_conv_stem", "_fc")}


def plan_for(model: str, fmt: str, method: str):
    from lowbit.plan import QuantPlan, Rule
    from lowbit.spec import ActivationQuant

    weight, act, observer = FORMATS[fmt]
    a = ActivationQuant(act, dynamic=False, observer=observer)
    algo = {"name": "adaround"} if method == "adaround" else "rtn"
    rules = []
    if int(weight[3]) < 6:
        a8 = ActivationQuant("int8-tensor", dynamic=False, observer="minmax")
        rules += [Rule(name, "int8", "rtn", a8, method == "dfq") for name in ENDS[model]]
    rules.append(Rule("*", weight, algo, a, method == "dfq"))
    transforms = ("equalize", "absorb_bias") if method == "dfq" else ("fold_batchnorm",) if method in ("adaround", "brecq") else ()
    if model == "fmnist-vit":
        transforms = ()  # no BatchNorm
    reconstruct = BRECQ_SETTINGS.get(model, {"iters": BRECQ_ITERS}) if method == "brecq" else None
    return QuantPlan(tuple(rules), (), transforms, None, reconstruct)


def run_row(model: str, fmt: str, method: str) -> dict:
    import torch

    from lowbit.memory import PeakRSS
    from lowbit.models import dataset_of, load_model
    from lowbit.quantizer import quantize

    torch.manual_seed(0)
    lm = load_model(model)
    ref = lm.model
    import copy

    q = copy.deepcopy(ref)
    if dataset_of(model) == "fashion-mnist":
        from lowbit.data.fashion_mnist import calibration_images

        calib = calibration_images(512, seed=0)
    else:
        from lowbit.data import calibration_views

        calib = calibration_views(64, seed=0)
    plan = plan_for(model, fmt, method)
    start = time.perf_counter()
    with PeakRSS() as mem:
        quantize(q, plan, calib, progress=False)
    seconds = time.perf_counter() - start
    row = {"model": model, "format": fmt, "method": method, "quantize_s": round(seconds, 1),
           "peak_mb": round(mem.peak / 2**20)}
    if dataset_of(model) == "fashion-mnist":
        from lowbit.data.fashion_mnist import fashion_mnist, to_inputs
        from lowbit.evaluation import agreement_from_logits, classifier_logits

        images, labels = fashion_mnist("test")
        x = to_inputs(images)
        lf, lq = (classifier_logits(m, x, batch_size=500, progress=False) for m in (ref, q))
        r = agreement_from_logits(lf, lq)
        row.update(float_acc=float((lf.argmax(-1) == labels).float().mean()),
                   acc=float((lq.argmax(-1) == labels).float().mean()), top1=r.top1, kl=r.kl)
    else:
        from lowbit.data import imagenet_views
        from lowbit.evaluation import agreement_from_logits, classifier_logits

        views = imagenet_views()
        r = agreement_from_logits(classifier_logits(ref, views, progress=False),
                                  classifier_logits(q, views, progress=False))
        row.update(top1=r.top1, top5=r.top5, kl=r.kl)
    return row


def code_version() -> str:
    root = Path(__file__).resolve().parents[1]
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=root, capture_output=True, text=True)
    dirty = subprocess.run(["git", "status", "--porcelain", "lowbit"], cwd=root, capture_output=True, text=True)
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def print_table(rows: list[dict]) -> None:
    print(f"{'model':20s} {'format':7s} {'method':9s} {'quality':>34s} {'quant s':>8s} {'peak MB':>8s}")
    for r in rows:
        if "acc" in r:
            quality = f"acc {100 * r['acc']:.2f}% ({100 * (r['acc'] - r['float_acc']):+.2f}), agr {100 * r['top1']:.1f}%"
        else:
            quality = f"top-1 agr {100 * r['top1']:.2f}%, KL {r['kl']:.4f}"
        print(f"{r['model']:20s} {r['format']:7s} {r['method']:9s} {quality:>34s} {r['quantize_s']:8.1f} "
              f"{r['peak_mb']:8d}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--formats", nargs="+", default=list(FORMATS), choices=list(FORMATS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--json", type=Path, required=True, help="JSON-lines file the rows are appended to")
    p.add_argument("--resume", action="store_true", help="skip rows already in --json for this code version")
    p.add_argument("--row", nargs=3, help=argparse.SUPPRESS)  # model format method: run one row, print JSON
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--speed", action="store_true", help="then time the integer EfficientNet-Lite0 against fp32 "
                   "(benchmarks/int8_graph.py: W8A8 with VNNI, else W8A7)")
    a = p.parse_args()
    if a.row:
        import torch

        torch.set_num_threads(a.threads)
        print(json.dumps(run_row(*a.row)))
        return
    version = code_version()
    done = []
    if a.resume and a.json.exists():
        done = [json.loads(line) for line in a.json.read_text().splitlines() if line.strip()]
        done = [r for r in done if r.get("version") == version]
    have = {(r["model"], r["format"], r["method"]) for r in done}
    rows = list(done)
    for model in a.models:
        for fmt in a.formats:
            if fmt == "W2A4" and model != "fmnist-resnet" or fmt == "W4A4" and model == "fmnist-vit":
                continue  # W4A4 / W2A4 are the CNN rows
            if fmt not in MODEL_FORMATS.get(model, (fmt,)):
                continue
            for method in a.methods:
                if method == "dfq" and model == "fmnist-vit":
                    continue  # no BatchNorm and no ReLU pair to equalize in a ViT
                if (model, fmt, method) in have:
                    continue
                out = subprocess.run([sys.executable, __file__, "--json", str(a.json), "--threads", str(a.threads),
                                      "--row", model, fmt, method], capture_output=True, text=True)
                if out.returncode != 0:
                    print(f"{model} {fmt} {method}: failed\n{out.stderr[-2000:]}", file=sys.stderr)
                    continue
                row = {**json.loads(out.stdout.strip().splitlines()[-1]), "version": version}
                with a.json.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                rows.append(row)
                print_table([row])
    print(f"\ncode version {version}\n")
    print_table(rows)
    if a.speed:
        from int8_graph import measure

        from lowbit import cpu_features

        print(f"\ninteger rows, images/s against fp32 in the same run (code version {version}):")
        measure(act_bits=8 if cpu_features.has_vnni() else 7, threads=a.threads)


if __name__ == "__main__":
    main()

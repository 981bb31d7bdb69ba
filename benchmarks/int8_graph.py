"""Integer EfficientNet-Lite0: fp32 against ``int8_conv_graph`` with residual adds in float and on uint8 codes.

One process, the variants timed in turns (``--rounds`` rounds of ``--reps`` batches each, after a warm-up), so
machine noise falls on all of them alike; medians and ratios to fp32 with BatchNorm folded and channels-last
(the faster float baseline). Top-1 agreement with the float model over the 220 bundled evaluation views.

    python benchmarks/int8_graph.py [--act-bits 8|7] [--batch 8] [--threads 2] [--busy]

``--busy`` starts one spinning shell loop for the timed part and stops it (``busy_core.py``), to show what a
shared machine does to each variant at the thread count given. 8-bit activations need a CPU with VNNI for the int8
kernel (``lowbit.cpu_features``); ``--act-bits 7`` runs everywhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

from busy_core import busy_core


def measure(act_bits: int = 8, batch: int = 8, threads: int = 2, rounds: int = 7, reps: int = 5,
            busy: bool = False, say=print) -> list[dict]:
    """Time the four variants in turns (see the module docstring); print the table with ``say``; return its rows."""
    import torch

    torch.set_num_threads(threads)
    from lowbit.bench import _fold_batchnorm, vision_plan
    from lowbit.data import calibration_views
    from lowbit.data.images import imagenet_views
    from lowbit import cpu_features
    from lowbit.kernels import int8_conv_graph, use_kernels
    from lowbit.models import load_model
    from lowbit.quantizer import quantize

    if act_bits == 8 and not cpu_features.has_vnni():
        raise SystemExit("8-bit activations need VNNI for the int8 kernel on this CPU; use --act-bits 7")
    from lowbit.bench import machine_line

    say(f"{machine_line()}, batch {batch}, load average {os.getloadavg()[0]:.2f} before the run"
        f"{', one core kept busy while timing' if busy else ''}")
    fp32 = load_model("efficientnet-lite0").model
    views = imagenet_views()
    with torch.inference_mode():
        float_top1 = torch.cat([fp32(v) for v in views.split(20)]).argmax(-1)
    fused = _fold_batchnorm(fp32).to(memory_format=torch.channels_last)
    q = load_model("efficientnet-lite0").model
    quantize(q, vision_plan(act_bits), list(calibration_views(64).split(8)), progress=False)
    use_kernels(q, keep_reference=False)
    float_adds, r1 = int8_conv_graph(q, residual_adds=False)
    int_adds, r2 = int8_conv_graph(q)
    variants = {"fp32 (as loaded)": fp32, "fp32, BatchNorm folded, channels-last": fused,
                f"int8 graph W8A{act_bits}, residual adds in float": float_adds,
                f"int8 graph W8A{act_bits}, residual adds on uint8 codes": int_adds}
    say(f"# float adds: {r1.describe()}\n# integer adds: {r2.describe()}")
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rates: dict[str, list[float]] = {k: [] for k in variants}
    with torch.inference_mode():
        top1 = {k: float((torch.cat([m(v) for v in views.split(20)]).argmax(-1) == float_top1).float().mean())
                for k, m in variants.items()}
        for m in variants.values():
            for _ in range(2):
                m(x)
        with busy_core(busy):
            for _ in range(rounds):
                for k, m in variants.items():
                    t = time.perf_counter()
                    for _ in range(reps):
                        m(x)
                    rates[k].append(reps * batch / (time.perf_counter() - t))
    base = statistics.median(rates["fp32, BatchNorm folded, channels-last"])
    first = statistics.median(rates["fp32 (as loaded)"])
    rows = [{"variant": k, "images_per_s": statistics.median(v), "min": min(v), "max": max(v),
             "vs_fp32": statistics.median(v) / first, "vs_fp32_folded": statistics.median(v) / base,
             "top1_vs_fp32": top1[k]} for k, v in rates.items()]
    say(f"\n| variant | images/s (median of {rounds}) | range | vs fp32 | vs fp32 folded | top-1 = fp32 |")
    say("|---|---|---|---|---|---|")
    for r in rows:
        say(f"| {r['variant']} | {r['images_per_s']:.1f} | {r['min']:.0f}-{r['max']:.0f} | {r['vs_fp32']:.2f}x | "
            f"{r['vs_fp32_folded']:.2f}x | {r['top1_vs_fp32']:.2%} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--act-bits", type=int, default=8, choices=(7, 8))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--busy", action="store_true", help="one process spins on a core while timing")
    a = p.parse_args()
    measure(a.act_bits, a.batch, a.threads, a.rounds, a.reps, a.busy)


if __name__ == "__main__":
    main()

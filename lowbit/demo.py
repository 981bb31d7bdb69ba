"""The main job on the bundled default model: float vs quantized perplexity, size and bits per weight.

Loads SmolLM2-135M, measures float perplexity on the bundled Wikipedia text, quantizes every linear layer
but ``lm_head`` with round-to-nearest, saves the artifact, loads it back from disk and measures the loaded
model, so the numbers printed are those of the real saved artifact.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

from lowbit.errors import InputError
from lowbit.evaluation import artifact_size, fitting_protocol, model_size, perplexity
from lowbit.io import load, save
from lowbit.models import load_model
from lowbit.plan import QuantPlan
from lowbit.quantizer import prepare, quantize

log = logging.getLogger(__name__)


def run_demo(model_name: str, scheme: str, tokens: int, out: str | None, progress: bool = True) -> int:
    plan = QuantPlan.uniform(scheme)
    print(f"lowbit demo: {model_name}, weights {plan.rules[0].weight.name} ({plan.rules[0].method.name}), "
          f"float: {', '.join(plan.skip)}")

    t = time.perf_counter()
    print("loading the model ...", flush=True)
    lm = load_model(model_name)
    print(f"loaded {lm.name} in {time.perf_counter() - t:.0f} s")
    if lm.kind != "causal-lm":
        raise InputError(f"the demo measures perplexity and needs a language model; {model_name!r} is an "
                         f"{lm.kind} (use `lowbit quantize` and `lowbit eval` for it)")
    prepare(lm.model, plan)  # a spec that does not fit fails now, not after the float run
    protocol = fitting_protocol(lm.model, tokens)  # the model's context may be shorter than 1024
    print(f"protocol: {protocol.describe()}")
    float_size = model_size(lm.model)
    print("measuring float perplexity ...", flush=True)
    ref = perplexity(lm.model, lm.tokenizer, protocol, progress=progress)
    print(f"float perplexity {ref.ppl:.3f} ({ref.seconds:.0f} s)")

    t = time.perf_counter()
    quantize(lm.model, plan, progress=progress)
    t_quant = time.perf_counter() - t
    print(f"quantized in {t_quant:.1f} s; saving, "
          "loading back from disk and measuring the quantized model ...", flush=True)
    with tempfile.TemporaryDirectory(prefix="lowbit-demo-") as tmp:
        path = Path(out) if out else Path(tmp) / "quantized"
        save(lm.model, path, source=lm.source, plan=plan)
        disk = artifact_size(path)
        tokenizer = lm.tokenizer
        del lm
        qmodel = load(path)  # evaluate what was written, not what is in memory
        q_size = model_size(qmodel)
        qres = perplexity(qmodel, tokenizer, protocol, progress=progress)

    rows = [
        ("float (fp32)", ref.ppl, float_size.total_bytes, 32.0, None),
        (f"{plan.rules[0].weight.name} rtn", qres.ppl, q_size.total_bytes, q_size.bits_per_quantized_weight, disk),
    ]
    print()
    print(f"{'model':24s} {'perplexity':>10s} {'vs float':>9s} {'in memory':>10s} {'bits/weight':>11s} {'on disk':>9s}")
    for name, ppl, nbytes, bpw, d in rows:
        print(f"{name:24s} {ppl:10.3f} {ppl / ref.ppl:8.3f}x {nbytes / 1e6:8.1f}MB {bpw:11.3f} "
              f"{'-' if d is None else f'{d / 1e6:.1f}MB':>9s}")
    print(f"\nquantized linear weights: {q_size.quantized_weights / 1e6:.1f}M weights in "
          f"{q_size.quantized_bytes / 1e6:.1f} MB ({q_size.bits_per_quantized_weight:.3f} bits each, scales and "
          f"zero points included); float parts: {q_size.float_bytes / 1e6:.1f} MB; quantization took {t_quant:.1f} s")
    return 0


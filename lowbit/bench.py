"""``lowbit bench``: how much faster and smaller quantized models run on this machine, against float, in one run.

Sections (each prints one table; every ratio is against fp32 measured in the same run):

* ``matmul``: one linear layer ``y = x @ W.T`` per format (``lowbit.evaluation.speed.MATMUL_FORMATS``) at
  typical LLM shapes and batch sizes.
* ``decode``: a causal LM (default SmolLM2-135M) in fp32, bf16 and lowbit's quantized formats: prefill
  time of a prompt, greedy batch-1 decode tokens/s, the bytes its weights take (parameters, buffers and
  the kernels' packed copies, each tensor once) and the resident memory it added to the process (total and anonymous).
  Each format is saved as a lowbit artifact first, then loaded and measured in a fresh process, so the
  resident memory is that format's alone (round-to-nearest weights: speed does not depend on the algorithm).
* ``engines``: the same causal LM's greedy decode on every engine in one process, in turns: fp32/bf16/int4
  eager, lowbit's decode engine, llama.cpp Q4_0 and Q4_K_M, with prefill, the fraction of the measured memory
  read bandwidth each reaches, and a second table with one core kept busy (``lowbit.bench_engines``).
* ``vision``: EfficientNet-Lite0 images/s in fp32 (as loaded, and ``fp32-fused``: BatchNorm folded into the
  convolutions by ``torch.fx`` and channels-last memory, the faster float baseline) and int8 (per-channel weights, static per-tensor 8-bit
  activations calibrated on bundled photos, oneDNN int8 convolutions), the latter as each convolution's own
  kernel (``int8``) and as fused int8 chains (``int8-graph``, ``lowbit.kernels.int8_conv_graph``: BatchNorm
  folded, activations fused, uint8 passed between convolutions), and both again with 7-bit activations
  (``w8a7``, ``w8a7-graph``: exact on CPUs without VNNI, where 8-bit activations stay on the reference path),
  with top-1 agreement with fp32 over the bundled evaluation views.

Quantized modules run through ``lowbit.kernels.use_kernels(model, keep_reference=False)``; the table names
the kernels used and how many modules stayed on the reference path.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from lowbit.errors import InputError, LowbitError
from lowbit.evaluation.speed import BATCHES, LLM_SHAPES, MATMUL_FORMATS, matmul_times

log = logging.getLogger(__name__)

SECTIONS = ("matmul", "decode", "engines", "vision")


@dataclass(frozen=True)
class LMFormat:
    """A format of the decode section: a float dtype, or a plan applied by round to nearest."""

    name: str
    description: str
    rules: tuple[tuple[str, str, str | None], ...] = ()  # (pattern, weight spec, dynamic activation spec)
    dtype: str = "float32"  # what the float parts compute in


LM_FORMATS: dict[str, LMFormat] = {f.name: f for f in (
    LMFormat("fp32", "float32 (the baseline)"),
    LMFormat("bf16", "bfloat16 weights and activations", dtype="bfloat16"),
    LMFormat("int4", "every linear incl. lm_head int4-g64-asym, embedding int8",
             (("*embed_tokens", "int8", None), ("*", "int4-g64-asym", None))),
    LMFormat("int8", "every linear incl. lm_head int8 per channel (weight-only), embedding int8",
             (("*embed_tokens", "int8", None), ("*", "int8", None))),
    LMFormat("w8a8", "every linear incl. lm_head int8 x dynamic per-token int8 activations, embedding int8",
             (("*embed_tokens", "int8", None), ("*", "int8", "int8-token"))),
    LMFormat("w4a8", "every linear incl. lm_head int4 per channel (asym) x dynamic per-token int8 activations, "
             "embedding int8", (("*embed_tokens", "int8", None), ("*", "int4-ch-asym", "int8-token"))),
)}


def lm_plan(fmt: LMFormat):
    """The QuantPlan of a quantized decode format (nothing skipped: lm_head and the embedding too)."""
    from lowbit.plan import QuantPlan, Rule
    from lowbit.spec import ActivationQuant, QuantSpec

    rules = tuple(Rule(p, w, "rtn", None if a is None else ActivationQuant(QuantSpec.parse(a), dynamic=True))
                  for p, w, a in fmt.rules)
    return QuantPlan(rules, skip=())


# ---- the whole run -------------------------------------------------------------------------------


def run_bench(sections: tuple[str, ...] = SECTIONS, *, model: str = "smollm2-135m",
              formats: tuple[str, ...] = tuple(LM_FORMATS),
              artifacts: tuple[str, ...] = (), shapes: tuple[tuple[int, int], ...] = LLM_SHAPES,
              batches: tuple[int, ...] = BATCHES, matmul_formats: tuple[str, ...] = tuple(MATMUL_FORMATS),
              prompt_tokens: int = 128, new_tokens: int = 128, vision_batch: int = 8, min_time: float = 0.3,
              say: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure ``sections`` and ``say`` one table per section; return every number (JSON-able)."""
    unknown = [s for s in sections if s not in SECTIONS]
    if unknown:
        raise InputError(f"unknown bench section(s) {unknown}; known: {', '.join(SECTIONS)}")
    bad = [f for f in formats if f not in LM_FORMATS]
    if bad:
        raise InputError(f"unknown decode format(s) {bad}; known: {', '.join(LM_FORMATS)}")
    if "fp32" not in formats and "decode" in sections:
        formats = ("fp32", *formats)  # every ratio is against fp32 of the same run
    say(machine_line())
    out: dict[str, Any] = {"machine": machine_line()}
    if "matmul" in sections:
        out["matmul"] = bench_matmul(shapes, batches, matmul_formats, min_time, say)
    if "decode" in sections:
        out["decode"] = bench_decode(model, formats, artifacts, prompt_tokens, new_tokens, say)
    if "engines" in sections:
        from lowbit.bench_engines import bench_engines

        out["engines"] = bench_engines(model, prompt_tokens, new_tokens, say=say)
    if "vision" in sections:
        out["vision"] = bench_vision(vision_batch, say)
    return out


def machine_line() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return f"# {cpu}; torch {torch.__version__}, {torch.get_num_threads()} threads"


# ---- matmul --------------------------------------------------------------------------------------


def bench_matmul(shapes, batches, formats, min_time, say) -> list[dict]:
    if "fp32" not in formats:
        formats = ("fp32", *formats)
    say("\n## Linear layer y = x @ W.T: median ms per call, and speed-up over fp32 (x)")
    head = f"{'in x out':>12} {'batch':>5} " + " ".join(f"{f:>9}" for f in formats) + "  " + \
        " ".join(f"{f + ' x':>10}" for f in formats if f != "fp32")
    say(head)
    rows = []
    for k, n in shapes:
        for r in matmul_times(k, n, batches, formats, min_time):
            ms = " ".join(f"{1000 * r.seconds[f]:9.3f}" for f in formats)
            xs = " ".join(f"{r.speedup(f):9.2f}x" for f in formats if f != "fp32")
            say(f"{f'{k}x{n}':>12} {r.batch:5d} {ms}  {xs}")
            rows.append({"in": k, "out": n, "batch": r.batch, "seconds": r.seconds})
    return rows


# ---- decode --------------------------------------------------------------------------------------


def bench_decode(model: str, formats, artifacts, prompt_tokens, new_tokens, say) -> list[dict]:
    work = Path(tempfile.mkdtemp(prefix="lowbit-bench-"))
    try:
        say(f"\n## {model}: decode (batch 1, greedy, {new_tokens} new tokens after a {prompt_tokens}-token prompt)")
        t0 = time.perf_counter()
        jobs = save_lm_formats(model, formats, work)
        for a in artifacts:
            jobs.append((Path(a).name, f"saved artifact {a}", Path(a), "float32"))
        log.info("prepared %d artifacts in %.0f s", len(jobs), time.perf_counter() - t0)
        say(f"{'format':>10} {'prefill ms':>10} {'tok/s':>8} {'vs fp32':>8} {'weights MB':>10} {'RSS MB':>8} "
            f"{'anon MB':>8}  kernels")
        rows, base = [], None
        for label, desc, folder, dtype in jobs:
            r = decode_in_fresh_process(folder, dtype, prompt_tokens, new_tokens)
            r.update(format=label, description=desc)
            base = base or r
            kern = ", ".join(f"{k} {v}" for k, v in sorted(r["kernels"].items())) or "-"
            say(f"{label:>10} {1000 * r['prefill_seconds']:10.1f} {r['decode_tokens_per_s']:8.1f} "
                f"{r['decode_tokens_per_s'] / base['decode_tokens_per_s']:7.2f}x {r['weight_bytes'] / 1e6:10.1f} "
                f"{r['model_rss_bytes'] / 1e6:8.1f} {r['model_anon_bytes'] / 1e6:8.1f}  {kern}")
            rows.append(r)
        say("  weights MB: every distinct parameter and buffer plus the kernels' packed copies; RSS MB: resident "
            "memory the model added to a fresh process, read after decoding (includes library code first run then); "
            "anon MB: the part not backed by files (a loaded fp32 artifact is mapped from its file, so it counts "
            "there)")
        for name in formats:
            say(f"  {name}: {LM_FORMATS[name].description}")
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


def save_lm_formats(model: str, formats, work: Path) -> list[tuple[str, str, Path, str]]:
    """Each of ``formats`` (``LM_FORMATS`` names) of ``model``, quantized by round to nearest and saved under
    ``work``: (name, description, artifact folder, float dtype) per format."""
    from lowbit.io import save
    from lowbit.models import load_model
    from lowbit.quantizer import quantize

    jobs = []
    for name in formats:
        fmt = LM_FORMATS[name]
        lm = load_model(model)
        if fmt.rules:
            quantize(lm.model, lm_plan(fmt), None, progress=False)
        folder = work / name
        save(lm.model, folder, source=lm.source)
        jobs.append((name, fmt.description, folder, fmt.dtype))
        del lm
    return jobs


def decode_in_fresh_process(folder: Path, dtype: str, prompt_tokens: int, new_tokens: int) -> dict:
    """:func:`decode_worker` on a saved artifact, in a new process with torch's current thread count."""
    return _in_fresh_process({"task": "decode", "folder": str(folder), "dtype": dtype,
                              "prompt_tokens": prompt_tokens, "new_tokens": new_tokens})


def decode_worker(folder: str, dtype: str, prompt_tokens: int, new_tokens: int) -> dict:
    """In a fresh process: load the artifact, attach kernels, measure memory and decode speed."""
    import gc

    import lowbit
    from lowbit.data import token_windows, wikipedia_text
    from lowbit.memory import anon_rss_bytes, release_free_memory, rss_bytes
    from lowbit.evaluation.speed import decode_speed, weight_bytes
    from lowbit.io import read_manifest
    from lowbit.kernels import use_kernels
    from lowbit.models import load_model

    manifest = read_manifest(folder)
    tokenizer = load_model(manifest["source"]).tokenizer  # tokenizer only; the float model is dropped
    gc.collect()
    release_free_memory()
    before, before_anon = rss_bytes(), anon_rss_bytes()
    model = lowbit.load(folder)
    if dtype != "float32":
        model = model.to(getattr(torch, dtype))
    report = use_kernels(model, keep_reference=False)
    gc.collect()
    release_free_memory()
    prompt = token_windows(tokenizer, wikipedia_text(), prompt_tokens, max_tokens=prompt_tokens)[:1]
    r = decode_speed(model, prompt, new_tokens)
    gc.collect()
    release_free_memory()
    model_rss = rss_bytes() - before  # after decoding, so every weight page has been touched
    model_anon = anon_rss_bytes() - before_anon
    return {"prefill_seconds": r.prefill_seconds, "decode_tokens_per_s": r.decode_tokens_per_s,
            "weight_bytes": weight_bytes(model), "model_rss_bytes": model_rss, "model_anon_bytes": model_anon,
            "kernels": report.counts(), "prompt_tokens": r.prompt_tokens, "new_tokens": r.new_tokens}


# ---- vision --------------------------------------------------------------------------------------


def bench_vision(batch: int, say) -> list[dict]:
    say(f"\n## efficientnet-lite0: images/s (batch {batch}, 224x224)")
    rows = []
    for label in ("fp32", "fp32-fused", "int8", "int8-graph", "w8a7", "w8a7-graph"):
        r = _in_fresh_process({"task": "vision", "format": label, "batch": batch})
        rows.append({"format": label, **r})
    say(f"{'format':>10} {'images/s':>9} {'vs fp32':>8} {'top-1 = fp32':>12}  kernels")
    for r in rows:
        kern = ", ".join(f"{k} {v}" for k, v in sorted(r["kernels"].items())) or "-"
        say(f"{r['format']:>10} {r['images_per_s']:9.1f} {r['images_per_s'] / rows[0]['images_per_s']:7.2f}x "
            f"{r['top1_vs_fp32']:12.2%}  {kern}{'; ' + r['graph'] if r.get('graph') else ''}")
    say("  fp32-fused: BatchNorm folded into the convolutions (torch.fx), channels-last memory. "
        "int8: every convolution int8 per channel with static per-tensor int8 activations (64 calibration "
        "crops of bundled photos), classifier int8 weight-only; BatchNorm float. int8-graph: the same model "
        "through int8_conv_graph. w8a7: the same with 7-bit activations (codes 0..127: the int8 kernel is exact "
        "without VNNI too). top-1 = fp32: agreement over the 220 bundled evaluation views")
    return rows


def vision_plan(act_bits: int = 8):
    from lowbit.plan import QuantPlan, Rule
    from lowbit.spec import ActivationQuant, QuantSpec

    act = ActivationQuant(QuantSpec.parse(f"int{act_bits}-tensor"), dynamic=False, observer="minmax")
    return QuantPlan((Rule("*", "int8", "rtn", act),), skip=())


def vision_worker(fmt: str, batch: int) -> dict:
    from lowbit.data import calibration_views
    from lowbit.data.images import imagenet_views
    from lowbit.evaluation.speed import images_per_second
    from lowbit.kernels import use_kernels
    from lowbit.kernels.conv_graph import int8_conv_graph
    from lowbit.models import load_model

    model = load_model("efficientnet-lite0").model
    views = imagenet_views()
    with torch.inference_mode():
        float_top1 = torch.cat([model(v) for v in views.split(20)]).argmax(-1)
    counts: dict[str, int] = {}
    graph = ""
    if fmt == "fp32-fused":
        model = _fold_batchnorm(model).to(memory_format=torch.channels_last)
    if fmt in ("int8", "int8-graph", "w8a7", "w8a7-graph"):
        from lowbit.quantizer import quantize

        quantize(model, vision_plan(7 if fmt.startswith("w8a7") else 8), list(calibration_views(64).split(8)),
                 progress=False)
        counts = use_kernels(model, keep_reference=False).counts()
        if fmt.endswith("-graph"):
            model, report = int8_conv_graph(model)
            graph = report.describe()
    with torch.inference_mode():
        top1 = torch.cat([model(v) for v in views.split(20)]).argmax(-1)
    return {"images_per_s": images_per_second(model, batch), "kernels": counts, "graph": graph,
            "top1_vs_fp32": float((top1 == float_top1).float().mean())}


def _fold_batchnorm(model: nn.Module) -> nn.Module:
    """A traced copy of ``model`` with each eval-mode BatchNorm folded into the convolution right before it
    (``torch.nn.utils.fusion.fuse_conv_bn_eval``; convolution subclasses such as EfficientNet's
    "same"-padding one are kept whole)."""
    import torch.fx as fx
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    class ConvLeaves(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, nn.Conv2d) or super().is_leaf_module(m, qualname)

    gm = fx.GraphModule(model, ConvLeaves().trace(model))
    modules = dict(gm.named_modules())
    for node in list(gm.graph.nodes):
        bn = modules.get(node.target) if node.op == "call_module" else None
        src = node.args[0] if bn is not None and node.args else None
        if not isinstance(bn, nn.BatchNorm2d) or not isinstance(src, fx.Node) or src.op != "call_module" \
                or not isinstance(modules[src.target], nn.Conv2d) or len(src.users) != 1:
            continue
        gm.set_submodule(src.target, fuse_conv_bn_eval(modules[src.target], bn))
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


# ---- fresh processes -----------------------------------------------------------------------------


def _in_fresh_process(job: dict) -> dict:
    """Run one measurement in a new Python process (same thread count) and return its JSON result.

    Raises:
        InputError: the worker stopped on bad input (a damaged artifact, say); its message is passed on.
        LowbitError: the worker failed otherwise; the message holds the end of its error output.
    """
    from lowbit.models.hf import remote_code_trusted

    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    # the opt-in to a model folder's own code (--trust-remote-code) lives in this process's context: pass it on
    job = {**job, "remote_code": remote_code_trusted()}
    cmd = [sys.executable, "-m", "lowbit.bench", json.dumps(job)]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = p.stdout.strip().splitlines()
    last = _json_line(lines[-1]) if lines else None
    what = f"bench worker {job['task']}" + (f" on {job['folder']}" if "folder" in job else "")
    if p.returncode == 0 and isinstance(last, dict) and "error" not in last:
        return last
    if isinstance(last, dict) and "error" in last:  # the worker caught a lowbit error and reported it
        raise InputError(f"{what}: {last['error']}")
    tail = "\n".join(p.stderr.strip().splitlines()[-8:]) or "(no error output)"
    raise LowbitError(f"{what} failed (exit {p.returncode}):\n{tail}")


def _json_line(line: str) -> Any:
    try:
        return json.loads(line)
    except ValueError:
        return None


def _worker_main(arg: str) -> None:
    from lowbit.models.hf import remote_code

    job = json.loads(arg)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    try:
        with remote_code(bool(job.get("remote_code", False))):
            r = _run_job(job)
    except InputError as e:  # bad input: one JSON line the parent turns back into an InputError
        print(json.dumps({"error": str(e)}))
        raise SystemExit(2) from None
    print(json.dumps(r))


def _run_job(job: dict) -> dict:
    if job["task"] == "decode":
        return decode_worker(job["folder"], job["dtype"], job["prompt_tokens"], job["new_tokens"])
    if job["task"] == "vision":
        return vision_worker(job["format"], job["batch"])
    raise InputError(f"unknown bench task {job['task']!r}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    _worker_main(sys.argv[1])

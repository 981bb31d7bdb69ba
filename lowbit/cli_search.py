"""``lowbit search`` (mixed precision: a recipe within a size budget) and ``lowbit report`` (its report).

    lowbit search smollm2-135m --budget 3.5bpw --formats int3-g64-asym,int4-g64-asym,int8 --method gptq \\
        --out mixed.yaml                     # also writes mixed.search.json, what the search measured
    lowbit quantize smollm2-135m --recipe mixed.yaml --out out/mixed
    lowbit report out/mixed --search mixed.search.json --out report/   # report.html, report.md, PNGs
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

from lowbit.cli import _positive_int, _progress, _rendered, _seed, _trust_flag
from lowbit.errors import InputError

log = logging.getLogger("lowbit")


def add_parsers(sub) -> None:
    s = sub.add_parser("search", help="choose a format per layer within a size budget (mixed precision) and write "
                       "the recipe")
    s.add_argument("model", help="bundled name, HF folder, .gguf or .onnx file")
    s.add_argument("--budget", required=True, help="average bits per weight, scales and zero points included "
                   "(3.5bpw), bytes of the searched layers (60MB, 48MiB), or their summed time per call on this "
                   "machine with lowbit's kernels (4ms, 800us; timed on --latency-tokens input rows)")
    s.add_argument("--latency-tokens", type=_positive_int, default=1, help="input rows per timed call for a time "
                   "budget (default 1: a decode step)")
    s.add_argument("--formats", required=True, help="candidate weight formats, comma-separated (e.g. "
                   "int3-g64-asym,int4-g64-asym,int8; see `lowbit schemes`)")
    s.add_argument("--method", default="rtn", help="the algorithm every candidate is quantized with, as in "
                   "`lowbit quantize` (rtn, gptq, awq, awq+gptq; default rtn)")
    s.add_argument("--measure", default="fisher", choices=("fisher", "proxy", "hutchinson", "kl"),
                   help="the sensitivity minimized (default fisher: each layer's output error weighted by the loss "
                   "gradient there; see lowbit.mixed.sensitivity)")
    s.add_argument("--also", nargs="*", default=[], choices=("fisher", "proxy", "hutchinson", "kl"),
                   help="further sensitivities to measure and keep in the record, for the report's comparison")
    s.add_argument("--calib-samples", type=_positive_int, default=32, help="calibration text windows (or images); "
                   "the last 2 are held out for the kl measure (default 32)")
    s.add_argument("--calib-len", type=_positive_int, default=512, help="tokens per calibration text window")
    s.add_argument("--calib-data", default=None, help="your own calibration text (.txt, .jsonl, a datasets folder)")
    s.add_argument("--calib-field", default="text", help="the text field of --calib-data (default: text)")
    s.add_argument("--calib-split", default=None, help="the split of a --calib-data datasets folder")
    s.add_argument("--seed", type=_seed, default=0, help="calibration sampling seed")
    s.add_argument("--skip", nargs="*", default=None, help="module-name patterns kept in float (default: role:head "
                   "role:embedding type:Embedding)")
    s.add_argument("--out", required=True, help="the recipe to write (YAML); the record goes next to it as "
                   "NAME.search.json")
    s.add_argument("--overwrite", action="store_true", help="replace an existing recipe and record")
    _trust_flag(s)
    s.set_defaults(func=cmd_search)

    r = sub.add_parser("report", help="HTML and Markdown report of a quantized folder: bits per layer, error, "
                       "sensitivity and the size/quality front of its search")
    r.add_argument("path", help="a folder written by `lowbit quantize`")
    r.add_argument("--search", default=None, help="the NAME.search.json `lowbit search` wrote (sensitivity, front)")
    r.add_argument("--out", required=True, help="folder for report.html, report.md and the PNG figures")
    r.add_argument("--overwrite", action="store_true", help="replace an existing report folder")
    r.add_argument("--no-reference", action="store_true", help="do not load the float model (no error columns)")
    r.set_defaults(func=cmd_report)


def record_path(recipe: str | Path) -> Path:
    """Where ``lowbit search`` keeps the record of a recipe: ``mixed.yaml`` -> ``mixed.search.json``."""
    p = Path(recipe)
    return p.with_name(p.stem + ".search.json")


def cmd_search(a: argparse.Namespace) -> int:
    from lowbit import load_model
    from lowbit.atomic import atomic_file
    from lowbit.data import calibration_set
    from lowbit.io.save import check_destination
    from lowbit.mixed import describe, search
    from lowbit.mixed.search import Budget, parse_formats
    from lowbit.models import default_bos
    from lowbit.plan import DEFAULT_SKIP

    budget = Budget.parse(a.budget)
    specs = parse_formats(a.formats)
    method = _method(a.method)
    out, record = Path(a.out), record_path(a.out)
    for p in (out, record):
        check_destination(p, a.overwrite, file=True)
    user_text = None
    if a.calib_data is not None:
        from lowbit.data.user_text import read_text

        user_text = read_text(a.calib_data, a.calib_field, a.calib_split, prefer_splits=("train",))
    lm = load_model(a.model)
    if lm.kind not in ("causal-lm", "image-classification"):
        raise InputError(f"lowbit search measures causal language models and image classifiers; {a.model} is a "
                         f"{lm.kind} model")
    data = calibration_set(lm.kind, lm.tokenizer, a.calib_samples, a.calib_len, seed=a.seed,
                           bos=lm.kind == "causal-lm" and default_bos(lm), text=_rendered(user_text, lm.tokenizer),
                           source=str(a.calib_data), model=lm.model)
    t0 = time.perf_counter()
    result = search(lm.model, data, specs, budget, method=method, measure=a.measure, measures=a.also,
                    skip=DEFAULT_SKIP if a.skip is None else tuple(a.skip), latency_tokens=a.latency_tokens,
                    progress=_progress())
    result.calibration.update({"model": a.model, "samples": a.calib_samples, "length": a.calib_len, "seed": a.seed,
                               "data": a.calib_data or "bundled"})
    with atomic_file(check_destination(record, a.overwrite, file=True)) as tmp:
        tmp.write_text(result.to_json(), encoding="utf-8")
    with atomic_file(check_destination(out, a.overwrite, file=True)) as tmp:
        tmp.write_text(result.recipe(), encoding="utf-8")
    print(describe(result))
    print(f"searched {lm.name} in {time.perf_counter() - t0:.1f} s -> {out} (record {record})")
    print(f"next: lowbit quantize {a.model} --recipe {out} --out OUT")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    from lowbit.mixed.report import write_report
    from lowbit.mixed.search import SearchResult

    result = None
    if a.search is not None:
        p = Path(a.search)
        if not p.is_file():
            raise InputError(f"--search {p}: no such file (lowbit search writes NAME.search.json next to its recipe)")
        try:
            result = SearchResult.from_dict(json.loads(p.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"--search {p} is not a lowbit search record: {e}") from None
    written = write_report(a.path, a.out, result, overwrite=a.overwrite, reference=not a.no_reference)
    print(f"report -> {written / 'report.html'} and {written / 'report.md'}")
    return 0


def _method(name: str):
    from lowbit.cli import _method as method_of

    return method_of(name, False)

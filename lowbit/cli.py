"""``lowbit`` command line: parse, call the library's verbs, print. No logic of its own.

    lowbit quantize MODEL --scheme int4-g128-asym [--method rtn] [--clip-search] --out DIR
    lowbit quantize MODEL --recipe recipe.yaml --out DIR
    lowbit eval MODEL_OR_DIR [--tokens N] [--window N] [--bos | --no-bos]
    lowbit inspect DIR [--no-reference]
    lowbit export DIR --format onnx|gguf|compressed-tensors --out PATH [--overwrite]
    lowbit generate MODEL_OR_DIR --prompt TEXT [--max-new-tokens N] [--chat] [--temperature T]
    lowbit bench [ARTIFACT ...] [--sections matmul decode vision] [--model MODEL] [--formats ...] [--json FILE]
    lowbit schemes
    lowbit demo
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from lowbit.errors import InputError, LowbitError

log = logging.getLogger("lowbit")


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse has printed its usage message
        return int(e.code or 0)
    # the demo prints its own steps; other commands report progress through INFO logging
    quiet = args.command in ("schemes", "demo")
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING if quiet else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        if getattr(args, "trust_remote_code", False):
            from lowbit.models.hf import remote_code

            log.warning("--trust-remote-code: a model folder's own Python code may run")
            with remote_code(True):
                return int(args.func(args) or 0)
        return int(args.func(args) or 0)
    except LowbitError as e:
        print(f"lowbit {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"lowbit {args.command}: interrupted", file=sys.stderr)
        return 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowbit", description="Quantize, evaluate and inspect neural networks.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model and save it")
    q.add_argument("model", help="bundled name (smollm2-135m, efficientnet-lite0, vit-s-focus), HF folder, .gguf "
                   "or .onnx file")
    g = q.add_mutually_exclusive_group()
    g.add_argument("--scheme", help="weight format, e.g. int4-g128-asym, int8, nvfp4 (see `lowbit schemes`)")
    g.add_argument("--recipe", help="YAML recipe file (a QuantPlan)")
    g.add_argument("--gguf-mix", metavar="MIX", help="llama.cpp's per-tensor types of a GGUF mix (Q4_K_M, Q5_K_M, "
                   "Q6_K...), values chosen by --method, for `lowbit export --format gguf`")
    q.add_argument("--method", default="rtn", help="algorithm: rtn, gptq, awq, awq+gptq or adaround (default: rtn)")
    q.add_argument("--clip-search", action="store_true", help="clipping-range search: output-error weighted from "
                   "calibration data for rtn, static group ranges for gptq (awq always searches)")
    q.add_argument("--act", help="activation format, e.g. int8-token (dynamic)")
    q.add_argument("--transforms", nargs="+", default=None, metavar="NAME",
                   help="float equivalence transforms applied first, in order: fuse_norms, rotate_residual, rotate, "
                        "rotate_inputs (see lowbit.transforms)")
    q.add_argument("--kv", help="KV-cache format, e.g. int8-token or int4-g32-asym (keys and values per head)")
    q.add_argument("--bias-correction", nargs="?", const=True, default=False, type=_analytic, metavar="analytic",
                   help="correct each layer's output mean shift, measured on calibration data; `--bias-correction "
                        "analytic`: derived from the BatchNorm before each layer, no data")
    q.add_argument("--calib-samples", type=_positive_int, default=None, help="calibration samples when the plan needs "
                   "data (default: 128 text windows of 512 tokens, or 64 images)")
    q.add_argument("--calib-len", type=_positive_int, default=512, help="tokens per calibration text window")
    q.add_argument("--calib-data", default=None, help="your own calibration text: a UTF-8 text file, .jsonl with "
                   "one {\"text\": ...} object per line or a folder saved by datasets' save_to_disk (a list of "
                   "role/content messages there is laid out by the model's chat template) (default: the bundled news "
                   "text); for speech models a folder of .wav clips; for vision-language models a folder of images "
                   "(with --prompt)")
    q.add_argument("--prompt", default=None, help="vision-language models: the prompt asked about each image "
                   "(default: \"Describe this image.\")")
    q.add_argument("--calib-field", default="text", help="the text field of --calib-data's JSON lines or column of its "
                   "datasets folder (default: text)")
    q.add_argument("--calib-split", default=None, help="the split of a --calib-data datasets folder saved from a "
                   "DatasetDict (default: train, or its only split)")
    q.add_argument("--seed", type=_seed, default=0, help="calibration sampling seed (0 to 2**64 - 1)")
    q.add_argument("--skip", nargs="*", default=None, help="module-name patterns kept in float, or role:head, "
                   "role:embedding, type:CLASS (default: role:head role:embedding type:Embedding)")
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--overwrite", action="store_true", help="replace an existing artifact at --out")
    q.add_argument("--no-resume", action="store_true", help="ignore (and replace) the finished blocks an "
                   "interrupted run of this command kept in .NAME.lowbit-resume next to --out")
    _trust_flag(q)
    q.add_argument("--calib-dtype", choices=("float32", "bfloat16"), default="float32", help="precision of the "
                   "block-by-block calibration passes (bfloat16: about 0.7x the time on CPUs with native bf16)")
    q.set_defaults(func=_cmd_quantize)

    e = sub.add_parser("eval", help="evaluate a model or a saved quantized folder")
    e.add_argument("target", help="bundled name (smollm2-135m, gemma3-270m, efficientnet-lite0, vit-s-focus), HF "
                   "folder, .gguf or .onnx file, or a folder written by `lowbit quantize`")
    e.add_argument("--tokens", type=_positive_int, default=16384, help="perplexity token budget (default 16384)")
    e.add_argument("--window", type=_positive_int, default=None,
                   help="perplexity window (default: 1024, or less if the model's context or --tokens is shorter)")
    e.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="prepend BOS to every perplexity window (default: the model's rule, "
                   "lowbit.models.default_bos: yes for Gemma, no for SmolLM2 and the tiny models)")
    e.add_argument("--views", type=_positive_int, default=None, help="image views for classifiers and image-to-image "
                   "models (default: all)")
    e.add_argument("--data", "--text", default=None, help="your own evaluation text instead of the bundled "
                   "Wikipedia text: a UTF-8 text file, .jsonl with one {\"text\": ...} object per line, or a folder "
                   "saved by datasets' save_to_disk (perplexity; for text encoders its sentences); for speech models "
                   "a folder of .wav clips, each with an optional same-named .txt transcript (word error rate); for "
                   "vision-language models a folder of images (with --prompt)")
    e.add_argument("--prompt", default=None, help="vision-language models: the prompt asked about each image "
                   "(default: \"Describe this image.\")")
    e.add_argument("--data-field", default="text", help="the text field of --data's JSON lines or column of its "
                   "datasets folder (default: text)")
    e.add_argument("--data-split", default=None, help="the split of a --data datasets folder saved from a DatasetDict "
                   "(default: test, then validation, or its only split)")
    e.add_argument("--agreement-tokens", type=_positive_int, default=4096,
                   help="tokens of the evaluation text on which a quantized LM's next-token distributions are "
                   "compared with the float model's (default 4096)")
    e.add_argument("--sentences", type=_positive_int, default=128,
                   help="sentences (or audio clips, or images) for encoder-decoder, vision-language and classifier "
                   "agreement (default 128)")
    e.add_argument("--new-tokens", type=_positive_int, default=64,
                   help="tokens the float model generates per audio clip (agreement and WER) or per image "
                   "(vision-language agreement) (default 64)")
    _trust_flag(e)
    e.set_defaults(func=_cmd_eval)

    i = sub.add_parser("inspect", help="per-layer table of a saved quantized folder")
    i.add_argument("path", help="a folder written by `lowbit quantize`")
    i.add_argument("--no-reference", action="store_true", help="skip SQNR (do not load the float model)")
    _trust_flag(i)
    i.set_defaults(func=_cmd_inspect)

    x = sub.add_parser("export", help="write a saved quantized folder in a format other runtimes load")
    x.add_argument("path", help="a folder written by `lowbit quantize`")
    x.add_argument("--format", required=True, choices=("onnx", "gguf", "compressed-tensors"),
                   help="onnx (QDQ, checked in onnxruntime), gguf (llama.cpp, transformers) or compressed-tensors "
                   "(pack-quantized Hugging Face folder for transformers and vLLM, checked in transformers)")
    x.add_argument("--out", required=True, help="output file (a folder for compressed-tensors), written atomically")
    x.add_argument("--overwrite", action="store_true", help="replace an existing export at --out")
    _trust_flag(x)
    x.set_defaults(func=_cmd_export)

    b = sub.add_parser("bench", help="speed and memory of quantized models against float on this machine")
    b.add_argument("artifacts", nargs="*", help="folders written by `lowbit quantize` to add to the decode table")
    b.add_argument("--sections", nargs="+", default=None, metavar="SECTION",
                   help="matmul, decode, engines, vision (default: all; only decode when artifacts are given)")
    b.add_argument("--model", default=None, help="causal LM of the decode table's float rows (default: the "
                   "artifacts' source model, else smollm2-135m)")
    b.add_argument("--formats", nargs="+", default=None, help="decode formats: fp32 bf16 int4 int8 w8a8 w4a8 (default: "
                   "all; only fp32 when artifacts are given)")
    b.add_argument("--new-tokens", type=_positive_int, default=128, help="decode: tokens generated (default 128)")
    b.add_argument("--prompt-tokens", type=_positive_int, default=128, help="decode: prompt length (default 128)")
    b.add_argument("--quick", action="store_true", help="matmul: only 4096x4096, shorter timing")
    b.add_argument("--json", default=None, help="also write every number to this JSON file")
    _trust_flag(b)
    b.set_defaults(func=_cmd_bench)

    from lowbit.cli_generate import add_parser as add_generate  # here: they read this module's helpers
    from lowbit.cli_search import add_parsers as add_search

    add_generate(sub)
    add_search(sub)
    s = sub.add_parser("schemes", help="list the named weight formats and algorithms")
    s.set_defaults(func=_cmd_schemes)

    d = sub.add_parser("demo", help="float vs 4-bit perplexity, size and bits/weight on SmolLM2-135M")
    d.add_argument("--model", default="smollm2-135m")
    d.add_argument("--scheme", default="int4-g128-asym")
    d.add_argument("--tokens", type=_positive_int, default=16384)
    d.add_argument("--out", default=None, help="keep the quantized folder here (default: a temp folder)")
    d.set_defaults(func=_cmd_demo)
    return p


def _trust_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-remote-code", action="store_true", help="let a model folder whose class only its own "
                   "code defines (config auto_map) run that code; off by default")


def _analytic(text: str) -> str:
    if text != "analytic":
        raise argparse.ArgumentTypeError(f"the only value it takes is 'analytic', got {text!r}")
    return text


def _positive_int(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {n}")
    return n


def _seed(text: str) -> int:
    """A seed torch's generator takes as given: 0 to 2**64 - 1 (it would read -1 as 2**64 - 1)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {text!r}") from None
    if not 0 <= n < 2**64:
        raise argparse.ArgumentTypeError(f"expected a seed from 0 to 2**64 - 1, got {n}")
    return n


def _progress() -> bool:
    """Progress bars only on a terminal: redirected to a log file they are thousands of carriage returns."""
    return sys.stderr.isatty()


# ---- commands --------------------------------------------------------------------------------------------


def _cmd_quantize(a: argparse.Namespace) -> int:
    from lowbit import QuantPlan, load_model, quantize, save
    from lowbit.calibration.checkpoint import resume_folder, resume_scope
    from lowbit.evaluation import model_size
    from lowbit.io import check_destination
    from lowbit.plan import DEFAULT_SKIP

    if a.recipe:
        given = [f for f, v in (("--method", a.method != "rtn"), ("--clip-search", a.clip_search), ("--act", a.act),
                                ("--bias-correction", a.bias_correction), ("--skip", a.skip is not None),
                                ("--transforms", a.transforms is not None), ("--kv", a.kv is not None)) if v]
        if given:
            raise InputError(f"{', '.join(given)} cannot be combined with --recipe; put those settings in the recipe")
        plan = QuantPlan.load(a.recipe)
    elif a.gguf_mix:
        from lowbit.export.gguf_mix import MIXES

        given = [f for f, v in (("--act", a.act), ("--bias-correction", a.bias_correction), ("--skip", a.skip),
                                ("--kv", a.kv)) if v]
        if given or a.gguf_mix.upper().replace("-", "_") not in MIXES:
            raise InputError(f"{', '.join(given)} cannot be combined with --gguf-mix" if given else
                             f"unknown --gguf-mix {a.gguf_mix!r}; known: {', '.join(MIXES)}")
        # stands in until the model's layers are known (it says whether calibration data is needed)
        plan = QuantPlan(QuantPlan.uniform("int8", _method(a.method, a.clip_search)).rules,
                         transforms=tuple(a.transforms or ()))
    elif not a.scheme:
        raise InputError("give a weight format with --scheme (e.g. int4-g128-asym; see `lowbit schemes`), --recipe "
                         "or --gguf-mix")
    else:
        method = _method(a.method, a.clip_search)
        skip = DEFAULT_SKIP if a.skip is None else tuple(a.skip)
        plan = QuantPlan.uniform(a.scheme, method, a.act, skip, a.bias_correction)
        if a.transforms or a.kv:
            plan = QuantPlan(plan.rules, plan.skip, tuple(a.transforms or ()), a.kv)
    # refuse a taken --out now, not after minutes of loading and quantizing (save checks again when writing)
    check_destination(a.out, a.overwrite, inputs=(a.model,))  # also refuses --out inside the model's folder
    user_text = audio = images = None
    if a.calib_data is not None:  # read (and refuse) the user's text, audio or images before loading anything
        from lowbit.data.saved_dataset import is_saved_dataset

        if Path(a.calib_data).is_dir() and not is_saved_dataset(a.calib_data):
            from lowbit.data.folders import media_folder

            audio, images = media_folder(a.calib_data, a.calib_samples)
        else:
            from lowbit.data.user_text import read_text

            user_text = read_text(a.calib_data, a.calib_field, a.calib_split, prefer_splits=("train",))
        if not plan.needs_data:
            log.warning("--calib-data %s is not used: the plan needs no calibration data", a.calib_data)
    # finished blocks are kept next to --out until the artifact is saved, so that a killed run resumes
    with resume_scope(resume_folder(a.out), fresh=a.no_resume) as resume:
        lm = load_model(a.model)
        if a.gguf_mix:
            from lowbit.export.gguf_mix import gguf_mix_plan

            plan = gguf_mix_plan(lm.model, a.gguf_mix, plan.rules[0].method, tuple(a.transforms or ()))
        user_text = _rendered(user_text, lm.tokenizer)
        data = None
        if plan.needs_data:
            from lowbit.data import calibration_set
            from lowbit.models import dataset_of, default_bos

            fe = _feature_extractor(lm.source) if audio is not None else None
            processor = _processor(lm.source) if images is not None else None
            dataset = dataset_of(lm.source)
            if dataset is not None and a.calib_data is not None:
                raise InputError(f"{a.model} calibrates on its own training set ({dataset}); leave --calib-data out")
            data = calibration_set(lm.kind, lm.tokenizer, a.calib_samples, a.calib_len, seed=a.seed,
                                   bos=lm.kind == "causal-lm" and default_bos(lm), text=user_text,
                                   source=str(a.calib_data), model=lm.model, audio=audio, feature_extractor=fe,
                                   images=images, processor=processor, prompt=a.prompt, dataset=dataset)
            origin = a.calib_data if a.calib_data is not None else (
                f"the {dataset} training images" if dataset is not None else
                "the bundled news text" if lm.tokenizer is not None else "lowbit's calibration photos")
            if hasattr(data, "shape"):
                shown = str(tuple(data.shape))
            elif images is not None:  # vision-language batches: an image, the prompt and the float model's answer
                lengths = [b["input_ids"].shape[1] for b in data]
                shown = (f"{len(data)} images with the prompt {a.prompt or 'Describe this image.'!r}, answered by the "
                         f"float model ({min(lengths)} to {max(lengths)} tokens each)")
            else:  # encoder-decoder batches: sources and the float model's outputs for them
                key = "input_ids" if "input_ids" in data[0] else next(iter(data[0]))
                rows = sum(b[key].shape[0] for b in data)
                what = (f"{data[0][key].shape[1]} tokens" if key == "input_ids"
                        else f"{key} {tuple(data[0][key].shape[1:])}")
                shown = (f"{rows} sources x {what}, decoded by the float model "
                         f"(up to {max(b['decoder_input_ids'].shape[1] for b in data)} decoder tokens)")
            print(f"calibration set: {shown} from {origin} (seed {a.seed})")
        t0 = time.perf_counter()
        quantize(lm.model, plan, data, progress=_progress(), checkpoint=resume, calib_dtype=a.calib_dtype)
        dt = time.perf_counter() - t0
        float_dtype = None
        if lm.source.get("type") == "hf-folder":  # float parts go back to the dtype the source stored them in
            from lowbit.models.hf import stored_float_dtype

            float_dtype = stored_float_dtype(lm.source["path"])
        out = save(lm.model, a.out, source=lm.source, plan=plan, overwrite=a.overwrite, float_dtype=float_dtype)
        if float_dtype is not None:
            print(f"float parts stored in {float_dtype}, as in the source")
    print(f"quantized {lm.name} in {dt:.1f} s -> {out}")
    print(model_size(lm.model).describe())
    return 0


def _method(name: str, clip_search: bool):
    """The algorithm named on the command line, with ``--clip-search`` applied where it means something."""
    from lowbit.algorithms import make_algorithm

    method = make_algorithm(name)
    if not clip_search:
        return method
    if method.name == "rtn":  # the CLI always has calibration data, so the search weighs the output error
        return {"name": "rtn", "clip_search": True, "weighted": True}
    if method.name == "gptq":
        return {**method.to_dict(), "clip_search": True}
    raise InputError(f"--clip-search does not apply to --method {name} (awq always searches its clipping ranges)")


def _cmd_eval(a: argparse.Namespace) -> int:
    from lowbit.cli_eval import cmd_eval

    return cmd_eval(a)


def _feature_extractor(source: dict | None):
    """The feature extractor of a model source's folder (None where the source has no folder or none is there)."""
    from lowbit.models.hf import load_feature_extractor

    if isinstance(source, dict) and source.get("type") == "hf-folder":
        return load_feature_extractor(source["path"])
    return None


def _rendered(user_text, tokenizer):
    """The user's text, with conversations (``lowbit.data.user_text.Conversations``) laid out by the model's chat
    template."""
    from lowbit.data.user_text import Conversations

    if isinstance(user_text, Conversations):
        n = len(user_text.chats)
        user_text = user_text.render(tokenizer)
        log.info("%d conversation(s) laid out by the model's chat template (%d characters)", n, len(user_text))
    return user_text


def _processor(source: dict | None):
    """The processor (image + prompt -> inputs) of a model source's folder, None where there is none."""
    from lowbit.models.hf import load_processor

    if isinstance(source, dict) and source.get("type") == "hf-folder":
        return load_processor(source["path"])
    return None


def load_model_from_source(source: dict):
    """The float model a saved artifact was made from (its manifest's ``source``)."""
    from lowbit.models import load_model

    return load_model(source)


def _cmd_inspect(a: argparse.Namespace) -> int:
    from lowbit.cli_inspect import cmd_inspect

    return cmd_inspect(a)


def _cmd_export(a: argparse.Namespace) -> int:
    from lowbit.io import check_destination, load, read_manifest

    if a.format == "compressed-tensors":
        from lowbit.export.compressed_tensors import check_export_folder

        check_export_folder(a.out, a.overwrite, inputs=(a.path,))  # before loading anything
    else:
        check_destination(a.out, a.overwrite, file=True, inputs=(a.path,))  # before loading or tracing anything
    manifest = read_manifest(a.path)
    model = load(a.path)
    if a.format == "compressed-tensors":
        from lowbit.export.compressed_tensors import export_compressed_tensors
        from lowbit.models.registry import load_tokenizer

        tokenizer = load_tokenizer(manifest["source"]) if manifest.get("source") is not None else None
        out = export_compressed_tensors(model, a.out, tokenizer=tokenizer, overwrite=a.overwrite)
        size = sum(f.stat().st_size for f in out.iterdir())
        print(f"wrote {out} ({size / 1e6:.1f} MB; load it with transformers' from_pretrained, or lowbit)")
        return 0
    if a.format == "gguf":
        from lowbit.export import export_gguf

        out = export_gguf(model, manifest.get("source"), a.out, overwrite=a.overwrite)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)")
        return 0
    from lowbit.export.onnx import check_onnx, default_inputs, export_onnx
    from lowbit.models.registry import load_tokenizer

    check_onnx(model)  # refuse before reading data or tracing
    tokenizer = load_tokenizer(manifest["source"]) if manifest.get("source") is not None else None
    example, check, kind = default_inputs(model, tokenizer)
    report = export_onnx(model, a.out, example, kind=kind, overwrite=a.overwrite, check=check)
    print(f"wrote {report.describe()}")
    return 0


def _cmd_bench(a: argparse.Namespace) -> int:
    import json

    from lowbit.bench import SECTIONS, run_bench
    from lowbit.io import check_destination, read_manifest
    from lowbit.atomic import atomic_file

    sources = {}
    for path in a.artifacts:
        manifest = read_manifest(path)  # a clear error for a folder that is not a lowbit artifact
        if manifest.get("source") is None:
            raise InputError(f"{path} records no model source, so its tokenizer cannot be found")
        src = manifest["source"]
        if src.get("type") == "hf-config":
            raise InputError(f"{path} was saved from Python and records its class and config only: no tokenizer or "
                             f"float model to benchmark it against; save it with source=LoadedModel.source")
        sources[path] = str(src.get("name") if src.get("type") == "bundled" else src.get("path"))
    model = a.model
    if model is None:  # the float baseline is the model the artifacts were made from
        if len(set(sources.values())) > 1:
            raise InputError("the artifacts come from different models (" + ", ".join(
                f"{p}: {src}" for p, src in sources.items()) + "); pass --model to choose the float baseline")
        model = next(iter(sources.values()), "smollm2-135m")
    elif any(src != model for src in sources.values()):
        log.warning("--model %s is not the source of every artifact (%s): ratios compare different models",
                    model, ", ".join(f"{p}: {src}" for p, src in sources.items()))
    if a.new_tokens < 2:
        raise InputError(f"--new-tokens must be at least 2 (decode speed is timed after the first), got {a.new_tokens}")
    json_path = None if a.json is None else check_destination(a.json, True, file=True)  # not after the run
    sections = tuple(a.sections or (("decode",) if a.artifacts else SECTIONS))
    formats = tuple(a.formats or (("fp32",) if a.artifacts else ("fp32", "bf16", "int4", "int8", "w8a8", "w4a8")))
    kw = {"shapes": ((4096, 4096),), "min_time": 0.15} if a.quick else {}
    out = run_bench(sections, model=model, formats=formats, artifacts=tuple(a.artifacts),
                    new_tokens=a.new_tokens, prompt_tokens=a.prompt_tokens, **kw)
    if json_path is not None:
        with atomic_file(json_path) as tmp:
            tmp.write_text(json.dumps(out, indent=1), encoding="utf-8")
    return 0


def _cmd_schemes(a: argparse.Namespace) -> int:
    from lowbit.algorithms import ALGORITHMS, CHAINS
    from lowbit.spec import GGML_NAMES, PRESETS, parse_spec

    print("weight formats (--scheme; any FORMAT[-ch|-tensor|-gN|-bRxC][-sym|-asym] also works):")
    for name, desc in PRESETS.items():
        s = parse_spec(name)
        print(f"  {name:16s} {desc}  [{s.format}, {s.bits} bit, {s.granularity}, scale {s.scale_format}]")
    print("llama.cpp block types (--scheme q4_k ...; the k-quants' scales are integers times an fp16 scale per 256):")
    for k, v in GGML_NAMES.items():
        print(f"  {k.replace('-', '_'):16s} {v}")
    print("algorithms (--method):")
    for name, cls in ALGORITHMS.items():
        print(f"  {name:16s} {(cls.__doc__ or '').strip().splitlines()[0]}")
    for name in CHAINS:
        print(f"  {name:16s} {' then '.join(p.upper() for p in name.split('+'))} (one algorithm's result handed to the next)")
    return 0


def _cmd_demo(a: argparse.Namespace) -> int:
    from lowbit.demo import run_demo

    return run_demo(a.model, a.scheme, a.tokens, a.out, progress=_progress())


if __name__ == "__main__":
    raise SystemExit(main())

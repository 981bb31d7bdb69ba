"""``lowbit generate``: stream a causal LM's continuation of a prompt, on lowbit's decode engine where it runs.

    lowbit generate out/smollm2-w4 --prompt "The capital of France is" [--max-new-tokens 128] [--chat]
        [--temperature 0.7 --top-p 0.9 --seed 0] [--engine auto|native|eager] [--threads auto|N] [--exact]

The text goes to standard output as it is generated; the timing line (prefill, tokens/s, threads used) to
standard error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from lowbit.cli import _positive_int
from lowbit.errors import InputError

log = logging.getLogger("lowbit")


def add_parser(sub) -> None:
    g = sub.add_parser("generate", help="stream a causal LM's continuation of a prompt (lowbit's decode engine)")
    g.add_argument("model", help="a folder written by `lowbit quantize`, a bundled name, an HF folder or a .gguf file")
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", help="read the prompt from this UTF-8 file")
    g.add_argument("--chat", action="store_true", help="lay the prompt out as one user turn with the model's chat "
                   "template (and stop at the end of the assistant's turn)")
    g.add_argument("--max-new-tokens", type=_positive_int, default=128)
    g.add_argument("--temperature", type=float, default=0.0, help="0 (default): greedy")
    g.add_argument("--top-k", type=int, default=0, help="sample from the k most likely tokens (0: all)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set reaching this mass")
    g.add_argument("--seed", type=int, default=None, help="seed of the sampler (default: random)")
    g.add_argument("--ignore-eos", action="store_true", help="generate --max-new-tokens tokens whatever they are")
    g.add_argument("--engine", choices=("auto", "native", "eager"), default="auto",
                   help="native: lowbit's C++ decode step (an error where it cannot run the model); eager: the "
                   "model's own forward pass per token; auto (default): native where it can")
    g.add_argument("--threads", default="auto", help="'auto' (default: 1 or all threads, whichever the last steps "
                   "ran faster, so a busy core does not stall decoding) or a count")
    g.add_argument("--exact", action="store_true", help="keep activations float32 in the 4-bit products (slower; "
                   "default: int8 activation blocks on CPUs with AVX-512 VNNI, as llama.cpp's Q8_0)")
    g.add_argument("--trust-remote-code", action="store_true", help="let a model folder's own Python code run")
    g.set_defaults(func=cmd_generate)


def cmd_generate(a: argparse.Namespace) -> int:
    from lowbit.runtime.generate import Generator

    threads = _threads(a.threads)
    prompt = _prompt_text(a)
    model, tokenizer, name = _load(a.model)
    if tokenizer is None:
        raise InputError(f"{a.model} has no tokenizer to turn the prompt into tokens")
    ids = _encode(tokenizer, prompt, a.chat)
    gen = Generator(model, engine=a.engine, threads=threads, max_len=len(ids) + a.max_new_tokens, exact=a.exact)
    stop = () if a.ignore_eos else _stop_ids(model, tokenizer)
    log.info("%s: %d prompt tokens, %s engine", name, len(ids), gen.engine)
    out, shown = [], ""
    for token in gen.tokens(ids, a.max_new_tokens, temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                            seed=a.seed, stop=stop):
        out.append(token)
        text = tokenizer.decode(out, skip_special_tokens=True)
        if not text.endswith("\ufffd"):  # a character whose bytes are not all out yet waits for the next token
            sys.stdout.write(text[len(shown):])
            sys.stdout.flush()
            shown = text
    sys.stdout.write("\n")
    print(gen.stats.describe(), file=sys.stderr)
    return 0


def _threads(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise InputError(f"--threads must be 'auto' or a positive count, got {text!r}")
    return n


def _prompt_text(a: argparse.Namespace) -> str:
    if a.prompt is not None:
        text = a.prompt
    else:
        path = Path(a.prompt_file)
        if not path.is_file():
            raise InputError(f"--prompt-file {path}: no such file")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f"--prompt-file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not text.strip():
        raise InputError("the prompt is empty")
    return text


def _load(target: str):
    """(model with kernels attached, tokenizer, display name) of an artifact folder or a model source."""
    from lowbit.io import load, read_manifest
    from lowbit.kernels import use_kernels
    from lowbit.models import load_model
    from lowbit.models.registry import load_tokenizer

    p = Path(target)
    if p.is_dir() and (p / "manifest.json").exists():
        manifest = read_manifest(p)
        source = manifest.get("source")
        model = load(p)
        tokenizer = load_tokenizer(source) if isinstance(source, dict) else None
        name = str(p)
    else:
        lm = load_model(target)
        if lm.kind != "causal-lm":
            raise InputError(f"{target} is a {lm.kind} model; generate needs a causal LM")
        model, tokenizer, name = lm.model, lm.tokenizer, lm.name
    if "CausalLM" not in type(model).__name__:
        raise InputError(f"{target} is a {type(model).__name__}; generate needs a causal LM (…ForCausalLM)")
    report = use_kernels(model, keep_reference=False)
    log.info("kernels: %s", ", ".join(f"{k} {n}" for k, n in sorted(report.counts().items())) or "none (float)")
    return model, tokenizer, name


def _encode(tokenizer, prompt: str, chat: bool) -> list[int]:
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("--chat: this model's tokenizer has no chat template")
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                             tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    else:
        ids = tokenizer(prompt)["input_ids"]
    if not ids:
        raise InputError("the prompt has no tokens")
    return list(ids)


def _stop_ids(model, tokenizer) -> tuple[int, ...]:
    """The end-of-sequence ids of the tokenizer and the model's generation config."""
    ids = set()
    for v in (getattr(tokenizer, "eos_token_id", None),
              getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(v, int):
            ids.add(v)
        elif isinstance(v, (list, tuple)):
            ids.update(int(x) for x in v)
    return tuple(sorted(ids))

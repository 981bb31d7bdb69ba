"""Encoder-decoder generation speed: quantized with lowbit's kernels against fp32, in one run.

    python benchmarks/seq2seq_speed.py [--threads 2] [--new-tokens 64] [--rounds 3] [--json out.json]

Two architectures at the shapes of real checkpoints (T5-small: d_model 512, 6 + 6 blocks, vocabulary 32,128;
Whisper-tiny: d_model 384, 4 + 4 blocks, vocabulary 51,865, 30 s of audio = 3,000 mel frames), built from their
configs with **random weights**: no such checkpoint installs offline here (``shared/ASSETS.md``), and the cost
of a matrix product does not depend on the values in it. Greedy generation, batch 1, exactly ``--new-tokens``
tokens (``min_new_tokens`` = ``max_new_tokens``), with the key/value cache, through the quantized modules and
their kernels (``lowbit.kernels.use_kernels``). Each variant is quantized once with round to nearest (default
skip: the embeddings and the tied head stay float); then the variants are timed in turn, round after round,
and the table gives each one's median over the rounds, as total seconds per generation and as new tokens/s
(the encoder included: that is what a user waits for). Check that the machine is otherwise idle first; the
load average is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from lowbit.bench import machine_line

VARIANTS = (("fp32", None), ("int8", "int8"), ("int4-g128", "int4-g128-asym"), ("w8a8", "int8"),
            ("w4a8", "int4-g128-asym"))
SHAPES = {
    "t5-small": ("T5Config", "T5ForConditionalGeneration", dict(
        vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    "whisper-tiny": ("WhisperConfig", "WhisperForConditionalGeneration", dict(
        vocab_size=51865, d_model=384, encoder_layers=4, decoder_layers=4, encoder_attention_heads=6,
        decoder_attention_heads=6, encoder_ffn_dim=1536, decoder_ffn_dim=1536, num_mel_bins=80,
        max_source_positions=1500, max_target_positions=448, decoder_start_token_id=50257, pad_token_id=50256,
        eos_token_id=50256, bos_token_id=50257, suppress_tokens=[], begin_suppress_tokens=[])),
}


def build(shape: str) -> torch.nn.Module:
    import transformers

    config_cls, model_cls, kwargs = SHAPES[shape]
    torch.manual_seed(0)
    return getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).eval()


def inputs(shape: str, model: torch.nn.Module) -> dict:
    g = torch.Generator().manual_seed(1)
    if shape.startswith("whisper"):
        return {"input_features": torch.randn(1, model.config.num_mel_bins, 3000, generator=g)}
    return {"input_ids": torch.randint(2, model.config.vocab_size, (1, 64), generator=g)}


def variant(shape: str, name: str, scheme: str | None) -> tuple[torch.nn.Module, dict]:
    """The model of ``shape`` quantized as ``name`` with its kernels attached, and the kernels' module counts."""
    import lowbit
    from lowbit.kernels import use_kernels
    from lowbit.plan import QuantPlan

    model = build(shape)
    if scheme is None:
        return model, {}
    act = "int8-token" if name in ("w8a8", "w4a8") else None
    lowbit.quantize(model, QuantPlan.uniform(scheme, act=act), progress=False)
    return model, use_kernels(model).counts()


def generate_seconds(model: torch.nn.Module, x: dict, new_tokens: int) -> float:
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**x, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                             num_beams=1)
    dt = time.perf_counter() - t0
    start = 1 if out.shape[1] == new_tokens + 1 else out.shape[1] - new_tokens
    if out.shape[1] - start != new_tokens:
        raise RuntimeError(f"generate returned {out.shape[1]} tokens, asked for {new_tokens} new ones")
    return dt


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--json", default=None)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # generate's notes on max_length defaults, once per call
    print(machine_line())
    print(f"# load average before: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    rows = []
    for shape in a.shapes:
        built = {name: variant(shape, name, scheme) for name, scheme in VARIANTS}
        models = {name: m for name, (m, _) in built.items()}
        x = inputs(shape, models["fp32"])
        for m in models.values():  # warm-up: first-call allocations, kernel selection
            generate_seconds(m, x, 4)
        times: dict[str, list[float]] = {name: [] for name in models}
        for _ in range(a.rounds):
            for name, m in models.items():  # alternating: a change in load hits every variant alike
                times[name].append(generate_seconds(m, x, a.new_tokens))
        base = statistics.median(times["fp32"])
        print(f"\n## {shape} (random weights), batch 1, {a.new_tokens} new tokens, median of {a.rounds} rounds")
        print(f"{'variant':>10} {'seconds':>9} {'tokens/s':>9} {'vs fp32':>8}  kernels")
        for name in models:
            t = statistics.median(times[name])
            kernels = built[name][1]
            shown = ", ".join(f"{k or 'reference'} {n}" for k, n in sorted(kernels.items())) or "-"
            print(f"{name:>10} {t:9.3f} {a.new_tokens / t:9.1f} {base / t:7.2f}x  {shown}")
            rows.append({"shape": shape, "variant": name, "seconds": t, "tokens_per_s": a.new_tokens / t,
                         "vs_fp32": base / t, "all_seconds": times[name], "kernels": kernels})
    print(f"\n# load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"machine": machine_line(), "new_tokens": a.new_tokens, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

"""``lowbit bench`` on tiny models: every section's table, the fresh-process decode worker, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.bench import LM_FORMATS, lm_plan, run_bench
from lowbit.cli import main
from lowbit.errors import InputError


def test_decode_and_matmul_tables_on_a_tiny_llm():
    lines: list[str] = []
    out = run_bench(("matmul", "decode"), model="tiny-llama", formats=("int4",), shapes=((64, 32),),
                    batches=(1,), prompt_tokens=8, new_tokens=3, min_time=0.0, say=lines.append)
    text = "\n".join(lines)
    assert "64x32" in text and "tiny-llama: decode" in text
    rows = {r["format"]: r for r in out["decode"]}
    assert list(rows) == ["fp32", "int4"]  # fp32 added: every ratio is against it
    assert rows["fp32"]["kernels"] == {}
    from lowbit import native

    int4 = "int4-weight-bf16" if native.why_unavailable() else "int4-weight-avx2"
    assert rows["int4"]["kernels"] == {"embedding-rows": 1, int4: 15}  # 2 x 7 linears + lm_head
    assert rows["int4"]["weight_bytes"] < rows["fp32"]["weight_bytes"] / 3
    assert all(r["decode_tokens_per_s"] > 0 and r["prefill_seconds"] > 0 for r in rows.values())
    json.dumps(out)  # every number is JSON-able


def test_every_quantized_format_quantizes_the_embedding_and_lm_head_and_runs_on_kernels():
    from lowbit.kernels import use_kernels
    from lowbit.models import load_model
    from lowbit.quantizer import quantize

    for f in LM_FORMATS.values():
        if f.rules:
            plan = lm_plan(f)
            assert plan.skip == () and plan.rule_for("model.embed_tokens").weight.name == "int8"
            assert plan.rule_for("lm_head") is not None
            lm = load_model("tiny-llama")
            quantize(lm.model, plan, progress=False)
            assert "reference" not in use_kernels(lm.model).counts()  # every quantized module has a kernel


def test_bad_sections_and_formats_are_refused():
    with pytest.raises(InputError, match="unknown bench section"):
        run_bench(("speed",), say=lambda s: None)
    with pytest.raises(InputError, match="unknown decode format"):
        run_bench(("decode",), formats=("int5",), say=lambda s: None)


def test_cli_bench_refuses_a_folder_that_is_not_an_artifact(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert str(tmp_path) in capsys.readouterr().err
    assert main(["bench", "--new-tokens", "1", "--sections", "decode"]) == 2


def test_cli_bench_takes_the_float_baseline_from_the_artifacts_source(tmp_path, monkeypatch, capsys):
    import lowbit.bench
    from lowbit.io import save
    from lowbit.models import load_model

    for name in ("tiny-llama", "tiny-gpt2"):
        lm = load_model(name)
        save(lm.model, tmp_path / name, source=lm.source)
    seen = []
    monkeypatch.setattr(lowbit.bench, "run_bench", lambda sections, **kw: seen.append(kw["model"]) or {})
    assert main(["bench", str(tmp_path / "tiny-llama")]) == 0
    assert seen == ["tiny-llama"]  # not the default smollm2-135m
    assert main(["bench", str(tmp_path / "tiny-llama"), str(tmp_path / "tiny-gpt2")]) == 2
    assert "different models" in capsys.readouterr().err and len(seen) == 1
    assert main(["bench", str(tmp_path / "tiny-llama"), str(tmp_path / "tiny-gpt2"), "--model", "tiny-opt"]) == 0
    assert seen[-1] == "tiny-opt"


def test_float_baseline_folds_batchnorm_into_convolution_subclasses_exactly():
    from torch import nn

    from lowbit.bench import _fold_batchnorm

    class SamePad(nn.Conv2d):  # a subclass with its own forward, as EfficientNet's "same"-padding convolution
        def forward(self, x):
            return super().forward(nn.functional.pad(x, (0, 1, 0, 1)))

    torch.manual_seed(0)
    model = nn.Sequential(SamePad(3, 8, 3, stride=2), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 4, 1),
                          nn.BatchNorm2d(4))
    for bn in (model[1], model[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
    model.eval()
    folded = _fold_batchnorm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, SamePad) for m in folded.modules())
    x = torch.randn(2, 3, 15, 15)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), atol=1e-5)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # the model itself is unchanged


def test_the_remote_code_opt_in_reaches_the_worker_process(monkeypatch, capsys):
    """``lowbit bench --trust-remote-code``: the opt-in lives in the parent's context, so it travels in the job
    and the worker sets it around its measurement."""
    import json
    import subprocess

    from lowbit import bench
    from lowbit.models.hf import remote_code, remote_code_trusted

    sent = []

    def fake_run(cmd, **kw):
        sent.append(json.loads(cmd[-1]))
        return subprocess.CompletedProcess(cmd, 0, stdout='{"ok": 1}\n', stderr="")

    monkeypatch.setattr(bench.subprocess, "run", fake_run)
    bench._in_fresh_process({"task": "vision", "format": "fp32", "batch": 1})
    with remote_code(True):
        bench._in_fresh_process({"task": "vision", "format": "fp32", "batch": 1})
    assert [j["remote_code"] for j in sent] == [False, True]

    monkeypatch.setattr(bench, "_run_job", lambda job: {"trusted": remote_code_trusted()})
    for job in sent:
        bench._worker_main(json.dumps(job))
    assert [json.loads(line)["trusted"] for line in capsys.readouterr().out.splitlines()] == [False, True]
    assert not remote_code_trusted()


def test_engines_table_on_a_tiny_llm():
    """Every engine row of ``lowbit bench --sections engines`` (no llama.cpp rows without llama-cpp-python, or
    for a model whose GGUF has no tokenizer), and the busy-core table."""
    from lowbit.bench_engines import bench_engines
    from lowbit import native

    lines: list[str] = []
    out = bench_engines("tiny-llama", prompt_tokens=8, new_tokens=4, rounds=1, busy=True, say=lines.append)
    quiet = out["quiet"]
    expected = {"fp32 eager", "bf16 eager", "int4 eager"}
    if native.why_unavailable() is None:
        expected |= {"fp32 engine", "int4 engine exact", "int4 engine"}
        assert set(out["busy"]) >= {"int4 engine auto", "int4 engine 1 thread"}
    assert expected <= set(quiet)
    for r in quiet.values():
        assert r["decode_tokens_per_s"] > 0 and r["prefill_seconds"] > 0 and 0 < r["bandwidth_fraction"]
    assert quiet["int4 eager"]["bytes_per_token"] < quiet["fp32 eager"]["bytes_per_token"] / 3
    assert any("of bandwidth" in line for line in lines)
    json.dumps(out)

"""The speed measurements (what they return and refuse; no speed is asserted: that is benchmarks/ work)."""

from __future__ import annotations

import pytest
import torch

from lowbit.errors import InputError
from lowbit.evaluation.speed import (MATMUL_FORMATS, decode_speed, matmul_layer, matmul_times, median_time,
                                     weight_bytes)
from lowbit import cpu_features, native
from lowbit.kernels import use_kernels
from lowbit.models import load_model
from lowbit.plan import QuantPlan
from lowbit.quantizer import quantize


def test_median_time_calls_at_least_min_reps_plus_a_warm_up():
    calls = []
    t = median_time(lambda: calls.append(1), min_time=0.0, min_reps=5)
    assert len(calls) == 6 and t >= 0


@pytest.mark.parametrize("fmt", list(MATMUL_FORMATS))
def test_every_matmul_format_runs_its_kernel_and_computes_the_same_product(fmt):
    layer, dtype, runs = matmul_layer(fmt, 128, 64)
    ref, _, _ = matmul_layer("fp32", 128, 64)
    x = torch.randn(5, 128, generator=torch.Generator().manual_seed(0))
    y = layer(x.to(dtype)).float()
    err = float((y - ref(x)).norm() / ref(x).norm())
    assert err < {"fp32": 1e-6, "bf16": 2e-2, "int8": 3e-2, "w8a8": 3e-2, "int4-g128": 0.2, "w4a8": 0.2}[fmt]
    if fmt not in ("fp32", "bf16"):
        avx2 = native.why_unavailable() is None
        assert runs == {"int4-g128": "int4-weight-avx2" if avx2 else "int4-weight-bf16",
                        "int8": "int8-weight-avx2" if avx2 else "int8-weight-bf16",
                        "w8a8": "w8a8-avx2" if avx2 and not cpu_features.has_vnni() else "w8a8-int-mm",
                        "w4a8": "w4a8-avx2" if avx2 else "w4a8-int-mm"}[fmt]
        assert layer.storage_released  # the bench measures what keep_reference=False holds


def test_matmul_times_gives_one_row_per_batch_with_every_format():
    rows = matmul_times(64, 32, batches=(1, 3), formats=("fp32", "int8"), min_time=0.0)
    assert [r.batch for r in rows] == [1, 3]
    assert all(set(r.seconds) == {"fp32", "int8"} and min(r.seconds.values()) > 0 for r in rows)
    assert rows[0].speedup("fp32") == 1.0
    with pytest.raises(InputError, match="unknown matmul format 'int5'"):
        matmul_layer("int5", 8, 8)


def test_decode_speed_on_a_tiny_llm_with_and_without_kernels():
    lm = load_model("tiny-llama")
    prompt = torch.randint(0, 256, (1, 6), generator=torch.Generator().manual_seed(0))
    r = decode_speed(lm.model, prompt, new_tokens=5, repeats=1)
    assert r.prompt_tokens == 6 and r.new_tokens == 5 and r.prefill_seconds > 0 and r.decode_tokens_per_s > 0
    float_bytes = weight_bytes(lm.model)
    quantize(lm.model, QuantPlan.uniform("int4-g32-asym", skip=()), progress=False)
    use_kernels(lm.model, keep_reference=False)
    assert weight_bytes(lm.model) < float_bytes / 4  # each packed weight counted once
    assert decode_speed(lm.model, prompt, new_tokens=3, repeats=1).decode_tokens_per_s > 0
    with pytest.raises(InputError, match=r"shape \(1, T\)"):
        decode_speed(lm.model, prompt[0], new_tokens=3)
    with pytest.raises(InputError, match="at least 2"):
        decode_speed(lm.model, prompt, new_tokens=1)

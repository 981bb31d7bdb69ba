"""Size report: numbers checked by hand, tied tensors and shared modules counted once, artifact bytes on disk."""

from __future__ import annotations

import math

import torch
from torch import nn

import lowbit
from lowbit.io.manifest import artifact_size
from lowbit.nn.size import SizeReport, human_bytes, model_size


def _linear(out_f: int, in_f: int, bias: bool = True) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(in_f, out_f, bias=bias)).eval()


def test_int4_g128_asym_by_hand():
    model = _linear(256, 256)
    lowbit.quantize(model, lowbit.QuantPlan.uniform("int4-g128-asym", skip=()), progress=False)
    r = model_size(model)
    codes = 256 * 256 * 4 // 8  # 32768 bytes of 4-bit codes
    scales = 256 * 2 * 2  # (256, 2) fp16 scales
    zeros = 256 * 2  # (256, 2) uint8 zero points
    assert r.quantized_layers == 1 and r.quantized_weights == 65536
    assert r.quantized_bytes == codes + scales + zeros == 34304
    assert r.bits_per_quantized_weight == 4 + (16 + 8) / 128 == 4.1875
    assert (r.float_params, r.float_bytes) == (256, 1024)  # the fp32 bias
    assert r.total_bytes == 34304 + 1024
    assert "4.188 bits/weight" in r.describe() and "65,536 quantized weights" in r.describe()
    assert r.to_dict()["bits_per_quantized_weight"] == 4.1875


def test_nvfp4_counts_the_global_scale():
    model = _linear(64, 64, bias=False)
    lowbit.quantize(model, lowbit.QuantPlan.uniform("nvfp4", skip=()), progress=False)
    r = model_size(model)
    assert r.quantized_bytes == 64 * 64 // 2 + 64 * 4 + 4  # codes, (64, 4) fp8 scales, one fp32 global scale
    assert r.float_params == 0


def test_float_model_and_tied_weights_counted_once():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(100, 16)
            self.head = nn.Linear(16, 100, bias=False)
            self.head.weight = self.emb.weight
            self.norm = nn.LayerNorm(16)

    r = model_size(Tied())
    assert r == SizeReport(0, 0, 0, 100 * 16 + 2 * 16, 4 * (100 * 16 + 2 * 16))
    assert math.isnan(r.bits_per_quantized_weight)
    assert r.to_dict()["bits_per_quantized_weight"] is None
    assert "no quantized weights" in r.describe()


def test_shared_quantized_module_counted_once():
    model = _linear(32, 64)
    lowbit.quantize(model, lowbit.QuantPlan.uniform("int8", skip=()), progress=False)
    single = model_size(model)
    model.append(model[0])  # the same module twice
    assert model_size(model) == single


def test_batchnorm_buffers_are_float_state():
    r = model_size(nn.BatchNorm1d(8))  # weight, bias, running mean/var (fp32) + num_batches_tracked (int64)
    assert (r.float_params, r.float_bytes) == (33, 4 * 32 + 8)


def test_artifact_size_is_the_bytes_on_disk(tmp_path):
    model = _linear(256, 256)
    lowbit.quantize(model, lowbit.QuantPlan.uniform("int4-g128-asym", skip=()), progress=False)
    path = lowbit.save(model, tmp_path / "art")
    files = sum(p.stat().st_size for p in path.iterdir())
    assert artifact_size(path) == files
    assert files > model_size(model).total_bytes  # tensor bytes + safetensors header + manifest


def test_human_bytes():
    assert [human_bytes(n) for n in (999, 34304, 1_234_567, 3_400_000_000)] == ["999 B", "34.3 kB", "1.2 MB",
                                                                                "3.40 GB"]

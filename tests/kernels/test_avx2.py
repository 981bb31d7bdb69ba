"""lowbit's C++ kernels (``int4-weight-avx2``, ``w4a8-avx2``, ``w8a8-avx2``), its activation quantizer, and how the
library is built."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lowbit.errors import InputError
from lowbit.formats import quantize as quantize_tensor
from lowbit import cpu_features, native
from lowbit.kernels import KERNELS, int4_avx2, kernel_name, use_kernels, w4a8_avx2
from lowbit.kernels.int8 import activation_codes
from lowbit.nn import QuantLinear
from lowbit.spec import ActivationQuant, QuantSpec

pytestmark = pytest.mark.skipif(native.why_unavailable() is not None, reason=str(native.why_unavailable()))


def _layer(out_f: int, in_f: int, wspec: str, aspec: str = "int8-token", seed: int = 0, **act) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    a = ActivationQuant(QuantSpec.parse(aspec), dynamic=True, **act)
    return QuantLinear.from_float(w, torch.randn(out_f, generator=g), quantize_tensor(w, QuantSpec.parse(wspec)), a,
                                  torch.rand(in_f, generator=g) + 0.5)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _at_thread_counts(m, x: torch.Tensor) -> list[torch.Tensor]:
    """``m(x)`` with torch (and so lowbit's kernels) on 1, 2 and 3 threads."""
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(m(x))
    finally:
        torch.set_num_threads(threads)
    return outs


@pytest.mark.parametrize("wspec", ["int4-g32", "int4-g64-asym", "int4-g128-asym", "int4-ch", "int4-ch-asym"])
@pytest.mark.parametrize("aspec", ["int8-token", "int8-token-asym", "int8-tensor-asym"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 9, 33])  # every tile shape: 8 x 1, 4 x 2, 2 x 4 and their tails
@pytest.mark.parametrize("in_f", [64, 96, 576])  # 96 in groups of 64: a last group of 32; 576 = 4.5 x 128
def test_matches_the_reference_to_float_rounding(wspec, aspec, rows, in_f):
    """Integer sums per group are exact; only the float scaling rounds."""
    m = _layer(40, in_f, wspec, aspec)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)) * 3 + 0.5
    ref = m.reference(x)
    assert kernel_name(m) is None and use_kernels(m).chosen[""] == "w4a8-avx2"
    assert _rel(m(x), ref) < 1e-6


def test_extreme_codes_do_not_saturate_the_16_bit_sums():
    """Codes 0 and 15 against zero points 15 and 0, activations at +-127: the largest pair sums the kernel adds."""
    k, n = 256, 16
    m = _layer(n, k, "int4-g128-asym")
    q = m.quantized_weight()
    codes = torch.zeros(n, k, dtype=torch.uint8)
    codes[::2] = 15
    zero = torch.zeros_like(q.zero_point)
    zero[1::2] = 15
    extreme = dataclasses.replace(q, codes=codes, zero_point=zero)
    m = QuantLinear.from_float(m.dequantized_weight(), None, extreme, m.act)
    x = torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0).repeat(5, 1) * 7.0
    ref = m.reference(x)
    use_kernels(m)
    assert kernel_name(m) == "w4a8-avx2"
    assert _rel(m(x), ref) < 1e-6
    assert float(ref.abs().min()) > 0  # the sums are large, not cancelled


def test_bf16_inputs_and_thread_counts_give_the_same_result():
    m = _layer(512, 512, "int4-g128-asym")  # 7 x 512 x 512 multiply-adds: enough work to run on several threads
    x = torch.randn(7, 512, generator=torch.Generator().manual_seed(2))
    use_kernels(m)
    outs = _at_thread_counts(m, x)
    assert all(torch.equal(outs[0], o) for o in outs[1:])  # each output is computed by one thread
    yb = m(x.to(torch.bfloat16))
    assert yb.dtype == torch.bfloat16 and _rel(yb, m.reference(x.to(torch.bfloat16).float())) < 1e-2


@pytest.mark.parametrize("scale_format", ["fp16", "fp32"])
@pytest.mark.parametrize("shape", [(1, 4096), (3, 576), (17, 100), (5, 7), (64, 1536)])
@pytest.mark.parametrize("magnitude", [1e-9, 1e-3, 1.0, 1e3, 1e6])
def test_the_c_quantizer_gives_lowbits_codes_and_scales(scale_format, shape, magnitude):
    spec = dataclasses.replace(QuantSpec.parse("int8-token"), scale_format=scale_format)
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(0)) * magnitude
    x[0, :3] = 0
    x[-1] = 0  # an all-zero row: the smallest scale of the format
    a, t, p = activation_codes(x, spec)
    xu, t2 = w4a8_avx2.native_codes(x, ActivationQuant(spec, dynamic=True))
    assert p is None and torch.equal(t.reshape(-1), t2.reshape(-1))
    assert torch.equal(a.view(torch.uint8) ^ 128, xu)


def test_the_c_quantizer_rounds_half_to_even_and_refuses_nan_and_inf():
    spec = QuantSpec.parse("int8-token")
    act = ActivationQuant(spec, dynamic=True)
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 126.5, -126.5] * 5])  # scale 1: ties everywhere
    a, t, _ = activation_codes(x, spec)
    xu, t2 = w4a8_avx2.native_codes(x, act)
    assert torch.equal(a.view(torch.uint8) ^ 128, xu) and torch.equal(t.reshape(-1), t2.reshape(-1))
    assert xu[0, 1:4].tolist() == [128, 130, 130]  # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.ones(2, 40)
        x[1, 37] = bad  # in the scalar tail of a row
        with pytest.raises(Exception, match="NaN/Inf"):
            w4a8_avx2.native_codes(x, act)
        x = torch.ones(2, 40)
        x[0, 3] = bad  # in the vector part
        with pytest.raises(Exception, match="NaN/Inf"):
            w4a8_avx2.native_codes(x, act)


@pytest.mark.parametrize("spec, out_f, in_f, why", [
    ("int4-g48", 32, 96, "group size 48"),
    ("int4-g64", 32, 80, "last group 16"),
])
def test_declines_shapes_it_cannot_run_and_the_next_kernel_takes_them(spec, out_f, in_f, why):
    m = _layer(out_f, in_f, spec)
    report = use_kernels(m, tuple(k for k in KERNELS if k.name == "w4a8-avx2"))
    assert why in report.reasons[""]["w4a8-avx2"]
    assert use_kernels(m).chosen[""] != "w4a8-avx2"
    x = torch.randn(3, in_f)
    assert _rel(m(x), m.reference(x)) < 1e-5


@pytest.mark.parametrize("out_f", [1, 20, 51])
@pytest.mark.parametrize("aspec", ["int8-token", "int8-token-asym"])  # the one-call C path, and the torch one
@pytest.mark.parametrize("wspec, kernel", [("int4-g32", "w4a8-avx2"), ("int8", "w8a8-avx2")])
def test_any_number_of_outputs_is_padded_to_the_row_block(no_vnni, out_f, aspec, wspec, kernel):
    m = _layer(out_f, 64, wspec, aspec)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(1))
    ref = m.reference(x)
    assert use_kernels(m).chosen[""] == kernel
    y = m(x)
    assert y.shape == (3, out_f) and _rel(y, ref) < 1e-6


def test_turned_off_by_the_environment_the_dispatch_says_so_and_falls_back(monkeypatch):
    monkeypatch.setenv(native.ENV, "0")
    m = _layer(32, 128, "int4-g64-asym")
    report = use_kernels(m, tuple(k for k in KERNELS if k.name == "w4a8-avx2"))
    assert "turned off (LOWBIT_NATIVE=0)" in report.reasons[""]["w4a8-avx2"]
    assert use_kernels(m).chosen[""] == "w4a8-int-mm"


def test_a_failed_build_is_a_reason_not_a_crash(monkeypatch, tmp_path):
    """A compiler error (here: a compiler that fails) makes the kernel decline with the compiler's output."""
    failing = tmp_path / "cxx"
    failing.write_text("#!/bin/sh\necho 'fatal: this compiler is broken' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CXX", str(failing))
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path / "cache"))
    native._load.cache_clear()
    try:
        why = native.why_unavailable()
        assert why is not None and "building lowbit's C++ kernels failed" in why and "this compiler is broken" in why
        m = _layer(32, 128, "int4-g64-asym")
        assert use_kernels(m).chosen[""] != "w4a8-avx2"
        assert not list((tmp_path / "cache").rglob("*.so"))  # nothing half-written left in the cache
    finally:
        monkeypatch.undo()
        native._load.cache_clear()
    assert native.why_unavailable() is None


def test_the_library_is_built_once_and_reused_from_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("LOWBIT_CACHE", str(tmp_path))
    native._load.cache_clear()
    try:
        native.library()
        built = list((tmp_path / "kernels").glob("lowbit_native_*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        native._load.cache_clear()
        native.library()
        assert built[0].stat().st_mtime_ns == stamp and len(list((tmp_path / "kernels").iterdir())) == 1
    finally:
        monkeypatch.undo()
        native._load.cache_clear()


def test_the_kernel_is_listed_before_the_int_mm_one():
    names = [k.name for k in KERNELS]
    assert names.index("w4a8-avx2") < names.index("w4a8-int-mm")


# ---- W8A8 through the nibble split ------------------------------------------------------------------------


@pytest.fixture
def no_vnni(monkeypatch):
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)


@pytest.mark.parametrize("wspec", ["int8", "int8-asym"])
@pytest.mark.parametrize("aspec", ["int8-token", "int8-token-asym", "int8-tensor-asym"])
@pytest.mark.parametrize("rows", [1, 3, 6, 20])
def test_w8a8_matches_the_reference_to_float_rounding(no_vnni, wspec, aspec, rows):
    m = _layer(24, 96, wspec, aspec)
    x = torch.randn(rows, 96, generator=torch.Generator().manual_seed(rows)) * 3 + 0.5
    ref = m.reference(x)
    assert use_kernels(m).chosen[""] == "w8a8-avx2"
    assert _rel(m(x), ref) < 1e-6


def test_w8a8_extreme_codes_split_exactly(no_vnni):
    """Codes 0 and 255 against zero points 255 and 0: every nibble combination at its bound."""
    m = _layer(16, 64, "int8-asym")
    q = m.quantized_weight()
    codes = torch.zeros(16, 64, dtype=torch.uint8)
    codes[::2] = 255
    codes[:, ::5] = 0x0F  # a high nibble of 0 and a low one of 15
    zero = torch.zeros_like(q.zero_point)
    zero[1::2] = 255
    zero[2] = 0xF0
    extreme = dataclasses.replace(q, codes=codes, zero_point=zero)
    m = QuantLinear.from_float(m.dequantized_weight(), None, extreme, m.act)
    x = torch.where(torch.arange(64) % 3 == 0, -1.0, 1.0).repeat(4, 1) * 5.0
    ref = m.reference(x)
    assert use_kernels(m).chosen[""] == "w8a8-avx2"
    assert _rel(m(x), ref) < 1e-6


def test_w8a8_is_left_to_int_mm_on_a_cpu_with_vnni(monkeypatch):
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: True)
    m = _layer(16, 64, "int8")
    report = use_kernels(m, tuple(k for k in KERNELS if k.name == "w8a8-avx2"))
    assert "has VNNI" in report.reasons[""]["w8a8-avx2"]
    assert use_kernels(m).chosen[""] == "w8a8-int-mm"


def test_w8a8_declines_inputs_not_a_multiple_of_32(no_vnni):
    m = _layer(16, 48, "int8")
    report = use_kernels(m, tuple(k for k in KERNELS if k.name == "w8a8-avx2"))
    assert "in_features 48 must be a multiple of 32" in report.reasons[""]["w8a8-avx2"]


@pytest.mark.parametrize("wspec, kernel", [("int4-g32", "w4a8-avx2"), ("int8", "w8a8-avx2")])
@pytest.mark.parametrize("rows", [3, 40])  # one thread, and several
def test_a_layer_refuses_nan_and_inf_inputs_with_a_clear_error(no_vnni, wspec, kernel, rows):
    """Symmetric per-token activations go through the one-call C path (quantize, product, scale, bias)."""
    m = _layer(16, 64, wspec)
    assert use_kernels(m).chosen[""] == kernel
    for bad in (float("nan"), float("inf")):
        x = torch.randn(rows, 64)
        x[1, 7] = bad
        with pytest.raises(InputError, match="NaN/Inf"):
            m(x)


# ---- 4-bit weight-only in float32 ---------------------------------------------------------------------------


def _weight_only(out_f: int, in_f: int, wspec: str, seed: int = 0, bias: bool = True,
                 input_scale: bool = False) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    s = torch.rand(in_f, generator=g) + 0.5 if input_scale else None
    return QuantLinear.from_float(w, b, quantize_tensor(w, QuantSpec.parse(wspec)), None, s)


@pytest.mark.parametrize("wspec", ["int4-g32", "int4-g64-asym", "int4-g128-asym", "int4-ch", "int4-ch-asym"])
# 1 row: codes unpacked in registers; 2-64: rows unpacked to float32 once per block; more: the weight unpacked for
# torch's float product (DEQUANT_ROWS)
@pytest.mark.parametrize("rows", [1, 2, 5, 64, 65])
@pytest.mark.parametrize("in_f, out_f", [(64, 40), (96, 8), (576, 51)])  # 96 in groups of 64: a last group of 32
def test_weight_only_matches_the_reference_to_float_rounding(wspec, rows, in_f, out_f):
    m = _weight_only(out_f, in_f, wspec, input_scale=in_f == 576)
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)) * 3 + 0.5
    ref = m.reference(x)
    assert use_kernels(m).chosen[""] == "int4-weight-avx2"
    y = m(x)
    assert y.shape == ref.shape and _rel(y, ref) < 1e-6


def test_weight_only_unpacks_the_reference_weight_exactly():
    m = _weight_only(40, 576, "int4-g64-asym")
    st = int4_avx2.pack(m)
    assert torch.equal(w4a8_avx2.dequantized_rows(st, 576, 0, st["n"])[:40], m.dequantized_weight())  # 40 of 40
    assert torch.equal(w4a8_avx2.dequantized_rows(st, 576, 8, 24), m.dequantized_weight()[8:24])


@pytest.mark.parametrize("wspec, kernel", [("int4-g64-asym", "int4-weight-avx2"), ("int8-asym", "int8-weight-avx2")])
def test_many_rows_take_the_weight_a_slice_of_rows_at_a_time(monkeypatch, wspec, kernel):
    from lowbit.kernels import dequant

    m = _weight_only(51, 128, wspec)
    assert use_kernels(m).chosen[""] == kernel
    x = torch.randn(70, 128, generator=torch.Generator().manual_seed(5))  # more rows than either DEQUANT_ROWS
    whole = m(x)
    monkeypatch.setattr(dequant, "SLICE_VALUES", 16 * 128)  # slices of 16 rows: 51 outputs in four
    sliced = m(x)
    assert _rel(sliced, whole) < 1e-6 and _rel(sliced, m.reference(x)) < 1e-6  # (float sums in another order)


def test_weight_only_extreme_codes_and_no_bias():
    k, n = 256, 16
    m = _weight_only(n, k, "int4-g128-asym", bias=False)
    q = m.quantized_weight()
    codes = torch.zeros(n, k, dtype=torch.uint8)
    codes[::2] = 15
    zero = torch.zeros_like(q.zero_point)
    zero[1::2] = 15
    m = QuantLinear.from_float(m.dequantized_weight(), None, dataclasses.replace(q, codes=codes, zero_point=zero))
    x = torch.where(torch.arange(k) % 3 == 0, -1.0, 1.0).repeat(3, 1) * 7.0
    ref = m.reference(x)
    use_kernels(m)
    for rows in (1, 3):
        assert _rel(m(x[:rows]), ref[:rows]) < 1e-6


def test_weight_only_other_dtypes_leading_dims_and_threads():
    m = _weight_only(512, 512, "int4-g128-asym")  # 512 x 512 multiply-adds per row: run on several threads
    x = torch.randn(2, 2, 512, generator=torch.Generator().manual_seed(3))
    use_kernels(m)
    outs = _at_thread_counts(m, x)
    assert outs[0].shape == (2, 2, 512) and all(torch.equal(outs[0], o) for o in outs[1:])
    for dtype in (torch.bfloat16, torch.float16):
        y = m(x.to(dtype))
        assert y.dtype == dtype and _rel(y, m.reference(x.to(dtype).float())) < 1e-2
    assert m(torch.empty(0, 512)).shape == (0, 512)


@pytest.mark.parametrize("spec", ["int8", "int8-asym"])
@pytest.mark.parametrize("rows", [1, 3, 32, 33])  # the C product up to DEQUANT_ROWS, the float32 weight beyond
@pytest.mark.parametrize("in_f, out_f", [(64, 40), (96, 8), (520, 3)])  # any number of outputs; inputs of 8 k
def test_int8_weight_only_matches_the_reference_to_float_rounding(spec, rows, in_f, out_f):
    m = _weight_only(out_f, in_f, spec, input_scale=in_f == 520)
    with torch.no_grad():
        m.bias[:1] = 0.0
    x = torch.randn(rows, in_f, generator=torch.Generator().manual_seed(rows)) * 3 + 0.5
    ref = m.reference(x)
    assert use_kernels(m).chosen[""] == "int8-weight-avx2"
    y = m(x)
    assert y.shape == ref.shape and _rel(y, ref) < 1e-6
    assert _rel(m(x.to(torch.bfloat16)), m.reference(x.to(torch.bfloat16).float())) < 1e-2


def test_weight_only_is_declined_for_activation_quantized_layers_and_odd_groups():
    report = use_kernels(_layer(16, 64, "int4-g32"), tuple(k for k in KERNELS if k.name == "int4-weight-avx2"))
    assert "weight-only" in report.reasons[""]["int4-weight-avx2"]
    report = use_kernels(_weight_only(16, 96, "int4-g48"), tuple(k for k in KERNELS if k.name == "int4-weight-avx2"))
    assert "group size 48" in report.reasons[""]["int4-weight-avx2"]


def test_the_parallel_threshold_changes_threads_not_results():
    m = _weight_only(64, 256, "int4-g64-asym")  # 256 x 64 = 16,384 multiply-adds per row
    w = _layer(64, 256, "int4-g64-asym")
    use_kernels(m)
    use_kernels(w)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4))
    before = native.set_parallel_work(0)  # every call on torch's threads
    try:
        parallel = (m(x), w(x))
        assert native.set_parallel_work(1 << 30) == 0  # every call on the calling thread
        alone = (m(x), w(x))
    finally:
        native.set_parallel_work(before)
    assert all(torch.equal(p, a) for p, a in zip(parallel, alone))
    with pytest.raises(ValueError, match=">= 0"):
        native.set_parallel_work(-1)


@pytest.mark.parametrize("wspec, act", [("int4-g32", None), ("int8", None), ("int4-g32", "int8-token")])
def test_an_input_of_the_wrong_width_is_refused_before_the_c_kernel_reads_it(wspec, act):
    m = _weight_only(16, 64, wspec)
    if act is not None:  # (without an input scale, whose product would refuse the width first)
        m = QuantLinear.from_float(m.dequantized_weight(), m.bias, m.quantized_weight(),
                                   ActivationQuant(QuantSpec.parse(act), dynamic=True))
    assert use_kernels(m).chosen[""] is not None
    with pytest.raises(InputError, match="does not end in the layer's 64 inputs"):
        m(torch.randn(2, 32))  # 64 values, but rows of 32

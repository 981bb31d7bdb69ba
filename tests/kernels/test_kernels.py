"""Every kernel against the reference path (``QuantModule.reference``), on odd shapes, plus the dispatch."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.errors import InputError
from lowbit.formats import quantize as quantize_tensor
from lowbit import cpu_features, native
from lowbit.kernels import KERNELS, kernel_name, release_kernels, use_kernels
from lowbit.nn import QuantConv2d, QuantLinear
from lowbit.plan import QuantPlan, Rule
from lowbit.quantizer import quantize
from lowbit.spec import ActivationQuant, QuantSpec

# bf16 activations / scales inside the weight-only kernels: relative error of a few 2^-8
BF16_TOL = 2e-2


# cases on a kernel of lowbit's C++ library: skipped where it cannot be built (the reason says why)
NATIVE = pytest.mark.skipif(native.why_unavailable() is not None, reason=str(native.why_unavailable()))
# the dispatch's first choice for weight-only layers: lowbit's float32 C++ kernels where they build, else torch's
INT4 = "int4-weight-bf16" if native.why_unavailable() else "int4-weight-avx2"
INT8 = "int8-weight-bf16" if native.why_unavailable() else "int8-weight-avx2"

# numerics of the oneDNN int8 convolution: only where it is exact (and chosen); elsewhere it is declined
needs_vnni = pytest.mark.skipif(not cpu_features.has_vnni(), reason="needs a CPU with VNNI (avx512_vnni / avx_vnni "
                                "/ amx_int8): without it oneDNN's int8 convolution saturates 16-bit sums and "
                                "the dispatch declines it")


def _linear(out_f: int, in_f: int, spec: str, act: str | None = None, bias: bool = True, seed: int = 0,
            input_scale: bool = False) -> QuantLinear:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(out_f, in_f, generator=g)
    b = torch.randn(out_f, generator=g) if bias else None
    q = quantize_tensor(w, QuantSpec.parse(spec))
    a = None if act is None else ActivationQuant(QuantSpec.parse(act), dynamic=True)
    s = torch.rand(in_f, generator=g) + 0.5 if input_scale else None
    return QuantLinear.from_float(w, b, q, a, s)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def _x(*shape: int, seed: int = 1, dtype=torch.float32) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def _attach(m: nn.Module, only: str | None = None) -> str | None:
    use_kernels(m, tuple(k for k in KERNELS if k.name == only) if only else KERNELS)
    return kernel_name(m)


@pytest.mark.parametrize("spec,in_f", [("int4-g32-asym", 96), ("int4-g64-asym", 576), ("int4-g128-asym", 576),
                                       ("int4-g128", 320), ("int4-ch-asym", 192), ("int4-ch", 160),
                                       ("int4-g256-asym", 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_kernel_matches_the_reference(spec, in_f, dtype):
    m = _linear(48, in_f, spec, input_scale=spec.endswith("asym"))
    x = _x(3, 5, in_f, dtype=dtype)
    ref = m.reference(x)
    assert _attach(m, only="int4-weight-bf16") == "int4-weight-bf16"
    y = m(x)
    assert y.shape == ref.shape == (3, 5, 48) and y.dtype == dtype
    assert _rel(y, ref) < BF16_TOL


@pytest.mark.parametrize("out_f", [40, 51, 1])
def test_int4_kernel_takes_any_number_of_outputs(out_f):
    """torch's kernel needs rows in multiples of 16: lowbit pads with zero-scale rows and cuts them off."""
    m = _linear(out_f, 128, "int4-g64-asym")
    x = _x(3, 4, 128)
    ref = m.reference(x)
    assert _attach(m, only="int4-weight-bf16") == "int4-weight-bf16"
    y = m(x)
    assert y.shape == ref.shape == (3, 4, out_f)
    assert _rel(y, ref) < BF16_TOL


@pytest.mark.parametrize("spec,out_f,in_f,why", [
    ("int4-g48", 32, 96, "no group"),              # 48 is not a multiple of 32, 64, 128 or 256
    ("int4-ch", 32, 200, "no group"),               # per channel on 200 inputs: no kernel group divides 200
    ("int3-g64-asym", 32, 128, "not a 4-bit"),
    ("nf4", 32, 128, "not a 4-bit"),
])
def test_shapes_and_formats_no_kernel_fits_stay_on_the_reference_path(spec, out_f, in_f, why):
    m = _linear(out_f, in_f, spec)
    report = use_kernels(m)
    assert report.chosen == {"": None}
    assert why in report.reasons[""]["int4-weight-bf16"]
    assert "stays on the reference path" in report.describe()
    x = _x(2, in_f)
    assert torch.equal(m(x), m.reference(x))


@pytest.mark.parametrize("spec", ["int8", "int8-asym"])
@pytest.mark.parametrize("in_f", [64, 208])
def test_int8_weight_only_kernel_matches_the_reference(spec, in_f):
    m = _linear(33, in_f, spec, input_scale=True)  # odd out_features: this kernel has no restriction
    x = _x(3, in_f)
    ref = m.reference(x)
    assert _attach(m, only="int8-weight-bf16") == "int8-weight-bf16"
    assert _rel(m(x), ref) < BF16_TOL
    x = _x(2, 17, in_f)  # more rows than int8.DEQUANT_ROWS: the float32 weight, in float32
    assert _rel(m(x), m.reference(x)) < 1e-6


def test_int8_weight_only_dequantizes_exactly_with_or_without_the_native_library(monkeypatch):
    from lowbit.kernels import int8

    for spec in ("int8", "int8-asym"):
        m = _linear(24, 64, spec)
        st = int8.weight_only_pack(m)
        assert torch.equal(int8.dequantized_weight(st), m.dequantized_weight())
        monkeypatch.setattr(native, "why_unavailable", lambda: "off for this test")
        assert torch.equal(int8.dequantized_weight(st), m.dequantized_weight())
        monkeypatch.undo()


@pytest.mark.parametrize("wspec", ["int8", "int8-asym"])
@pytest.mark.parametrize("aspec", ["int8-token", "int8-token-asym", "int8-tensor", "int8-tensor-asym"])
@pytest.mark.parametrize("rows", [1, 17, 64])
@pytest.mark.parametrize("kernel, in_f", [("w8a8-int-mm", 136), pytest.param("w8a8-avx2", 160, marks=NATIVE)])
def test_w8a8_kernel_matches_the_reference_to_float_rounding(monkeypatch, wspec, aspec, rows, kernel, in_f):
    """Integer accumulation is exact: only the final float scaling differs from the reference."""
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)  # w8a8-avx2 is for CPUs without it
    m = _linear(40, in_f, wspec, act=aspec, input_scale=True)
    x = _x(rows, in_f) * 3 + 0.5  # off-centre, so asymmetric zero points matter
    ref = m.reference(x)
    assert _attach(m, kernel) == kernel
    assert _rel(m(x), ref) < 1e-5


@pytest.mark.parametrize("wspec", ["int4-g32", "int4-g128-asym", "int4-ch", "int4-ch-asym"])
@pytest.mark.parametrize("aspec", ["int8-token", "int8-token-asym", "int8-tensor-asym"])
@pytest.mark.parametrize("rows", [1, 17])
@pytest.mark.parametrize("in_f", [256, 320])  # 320 in groups of 128: a last group of 64, as SmolLM2's 576
def test_w4a8_kernel_matches_the_reference_to_float_rounding(wspec, aspec, rows, in_f):
    """Per group, one exact int8 x int8 product and integer corrections: only the float scaling rounds."""
    m = _linear(40, in_f, wspec, act=aspec, input_scale=True)
    x = _x(rows, in_f) * 3 + 0.5
    ref = m.reference(x)
    assert _attach(m, "w4a8-int-mm") == "w4a8-int-mm"
    assert _rel(m(x), ref) < 1e-5


@pytest.mark.parametrize("kernel", ["w4a8-int-mm", pytest.param("w4a8-avx2", marks=NATIVE)])
def test_w4a8_kernel_runs_after_an_online_rotation(kernel):
    from lowbit.nn.rotation import rotate_input

    w = torch.randn(24, 96, generator=torch.Generator().manual_seed(3))
    m = QuantLinear.from_float(w, None, quantize_tensor(w, QuantSpec.parse("int4-g32-asym")),
                               ActivationQuant(QuantSpec.parse("int8-token")), input_rotation=96)
    x = _x(5, 96)
    ref = m.reference(x)
    assert _attach(m, kernel) == kernel
    assert _rel(m(x), ref) < 1e-5
    assert _rel(ref, rotate_input(x, 96) @ m.dequantized_weight().T) < 0.02  # the kernel got the rotated input


@pytest.mark.parametrize("spec, out_f, in_f, act, why", [
    ("int4-g48", 20, 96, "int8-token", "out_features 20 must be"),      # groups fine, 20 outputs are not
    ("int4-g40", 32, 100, "int8-token", "last group 20"),             # 100 = 40 + 40 + 20
    ("int4-g36", 32, 72, "int8-token", "group size 36"),              # not a multiple of 8
    ("int4-g32", 32, 96, "int4-token", "not 8-bit integer per token"),
])
def test_w4a8_declines_what_it_cannot_run_exactly(spec, out_f, in_f, act, why):
    m = _linear(out_f, in_f, spec, act=act)
    report = use_kernels(m, tuple(k for k in KERNELS if k.name == "w4a8-int-mm"))
    assert why in report.reasons[""]["w4a8-int-mm"]
    x = _x(3, in_f)
    assert torch.equal(m(x), m.reference(x))


@pytest.mark.parametrize("wspec, kernel", [("int8", "w8a8-int-mm"), ("int8-asym", "w8a8-int-mm"),
                                           ("int4-g32-asym", "w4a8-int-mm"), ("int4-ch", "w4a8-int-mm"),
                                           pytest.param("int8", "w8a8-avx2", marks=NATIVE),
                                           pytest.param("int4-g32-asym", "w4a8-avx2", marks=NATIVE)])
@pytest.mark.parametrize("aspec", ["int8-tensor", "int8-tensor-asym", "int7-tensor", "int4-tensor-asym"])
def test_static_activation_ranges_run_on_the_integer_kernels_with_the_reference_codes(monkeypatch, wspec, kernel,
                                                                                       aspec):
    """A calibrated per-tensor range (8 bits or fewer, symmetric or with a zero point) gives the reference path's
    codes, including inputs beyond the range, which both clamp."""
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)  # the avx2 kernels are for CPUs without it
    g = torch.Generator().manual_seed(6)
    w = torch.randn(40, 96, generator=g)
    act = ActivationQuant(QuantSpec.parse(aspec), dynamic=False)
    m = QuantLinear.from_float(w, torch.randn(40, generator=g), quantize_tensor(w, QuantSpec.parse(wspec)), act)
    m.set_activation_range(torch.tensor(-1.5), torch.tensor(4.0))
    x = _x(7, 96) * 3 + 0.5  # some of it beyond [-1.5, 4]
    ref = m.reference(x)
    assert _attach(m, kernel) == kernel
    assert _rel(m(x), ref) < 1e-5
    wide = copy.deepcopy(m)
    release_kernels(wide)
    wide.set_activation_range(torch.tensor(-20.0), torch.tensor(20.0))
    assert _rel(wide.reference(x), ref) > 1e-3  # the calibrated range decided the codes


def test_static_activations_other_than_integer_per_tensor_are_declined():
    w = torch.randn(16, 64, generator=torch.Generator().manual_seed(2))
    m = QuantLinear.from_float(w, None, quantize_tensor(w, QuantSpec.parse("int8")),
                               ActivationQuant(QuantSpec.parse("fp8-e4m3-tensor"), dynamic=False))
    report = use_kernels(m)
    assert "not an integer format of at most 8 bits per tensor" in report.reasons[""]["w8a8-int-mm"]
    assert report.chosen[""] is None


def test_int8_weight_only_kernels_decline_inputs_they_cannot_read():
    m = _linear(32, 200, "int8")  # 200 = 8 x 25: torch's kernel needs multiples of 16, lowbit's of 8
    report = use_kernels(m, tuple(k for k in KERNELS if k.name == "int8-weight-bf16"))
    assert "multiple of 16" in report.reasons[""]["int8-weight-bf16"]
    assert use_kernels(m).chosen[""] == (None if INT8 == "int8-weight-bf16" else INT8)
    m = _linear(32, 196, "int8")
    report = use_kernels(m)
    assert report.chosen == {"": None} and "not a multiple of 8" in report.reasons[""]["int8-weight-avx2"]
    x = _x(3, 196)
    assert torch.equal(m(x), m.reference(x))


def test_w8a8_is_not_chosen_for_dynamic_activations_of_other_widths():
    m = _linear(32, 64, "int8", act="int4-token")
    report = use_kernels(m)
    assert "not 8-bit integer per token" in report.reasons[""]["w8a8-int-mm"]
    assert report.chosen[""] is None  # the weight-only int8 kernel declines quantized activations


def _conv(c_in: int, c_out: int, k: int, stride: int, groups: int, act: str, padding=None) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    conv = nn.Conv2d(c_in, c_out, k, stride=stride, padding=k // 2, groups=groups)
    float_model = nn.Sequential(conv)
    plan = QuantPlan((Rule("*", "int8", act={"spec": act, "dynamic": False, "observer": "minmax"}),))
    calib = [torch.randn(2, c_in, 13, 11) * 2 + 0.3 for _ in range(2)]
    q = quantize(copy.deepcopy(float_model), plan, calib, progress=False)
    if padding is not None:
        q[0].input_padding = padding
    return float_model, q


@needs_vnni
@pytest.mark.parametrize("c_in,c_out,k,stride,groups", [(3, 16, 3, 2, 1), (16, 16, 3, 1, 16), (8, 24, 1, 1, 1),
                                                        (12, 12, 5, 2, 12)])
@pytest.mark.parametrize("act", ["int8-tensor-asym", "int8-tensor"])
def test_int8_conv_kernel_matches_the_reference(c_in, c_out, k, stride, groups, act):
    _, q = _conv(c_in, c_out, k, stride, groups, act)
    x = torch.randn(2, c_in, 13, 11) * 2 + 0.3
    ref = q[0].reference(x)
    assert _attach(q[0]) == "conv-int8-onednn"
    y = q(x)
    assert y.shape == ref.shape and _rel(y, ref) < 1e-5


@needs_vnni
def test_int8_conv_kernel_applies_asymmetric_input_padding():
    _, q = _conv(4, 8, 3, 2, 1, "int8-tensor-asym", padding=(0, 1, 0, 1))
    x = torch.randn(1, 4, 12, 12)
    ref = q[0].reference(x)
    assert _attach(q[0]) == "conv-int8-onednn"
    assert _rel(q(x), ref) < 1e-5


def test_int8_conv_kernel_is_chosen_only_on_a_cpu_with_vnni(monkeypatch):
    """Without VNNI oneDNN sums u8 x s8 products pairwise in saturating int16 (wrong for full-range codes):
    the dispatch declines with that reason and the layer keeps the reference path. Detection monkeypatched,
    so both sides run on every CPU."""
    _, q = _conv(8, 24, 1, 1, 1, "int8-tensor")
    x = torch.randn(2, 8, 13, 11) * 2 + 0.3
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)
    report = use_kernels(q)
    assert report.chosen == {"0": None}
    why = report.reasons["0"]["conv-int8-onednn"]
    assert why == cpu_features.NO_VNNI and "no VNNI" in why and "saturat" in why
    assert "0 stays on the reference path (" in report.describe() and "no VNNI" in report.describe()
    assert torch.equal(q(x), q[0].reference(x))
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: True)
    assert use_kernels(q).chosen == {"0": "conv-int8-onednn"}


def test_the_linear_kernels_do_not_depend_on_vnni(monkeypatch):
    """torch._int_mm and the weight-only kernels are exact (to their float rounding) without VNNI too; W8A8
    runs on lowbit's AVX2 kernel there when it is built, on torch._int_mm where VNNI is present."""
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)
    w8a8 = "w8a8-int-mm" if native.why_unavailable() else "w8a8-avx2"
    for spec, act, kernel in (("int8", "int8-token", w8a8), ("int8", None, INT8), ("int4-g32-asym", None, INT4)):
        assert _attach(_linear(32, 64, spec, act=act)) == kernel
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: True)
    assert _attach(_linear(32, 64, "int8", act="int8-token")) == "w8a8-int-mm"


@pytest.mark.parametrize("flags,vnni", [({"avx2", "fma"}, False), ({"avx2", "avx512f", "avx512bw"}, False),
                                        ({"avx2", "avx512f", "avx512_vnni"}, True), ({"avx2", "avx_vnni"}, True),
                                        ({"avx512_vnni", "amx_tile", "amx_int8"}, True)])
def test_vnni_is_read_from_the_cpu_flags(monkeypatch, flags, vnni):
    monkeypatch.setattr(cpu_features, "cpu_flags", lambda: frozenset(flags))
    assert cpu_features.has_vnni() is vnni


def test_conv_without_static_activations_stays_on_the_reference_path():
    conv = nn.Conv2d(4, 8, 3)
    q = quantize(nn.Sequential(conv), QuantPlan.uniform("int8"), progress=False)
    report = use_kernels(q)
    assert "static" in report.reasons["0"]["conv-int8-onednn"]


def test_dispatch_report_release_and_invalidation():
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48))
    q = quantize(model, QuantPlan((Rule("0", "int4-g32-asym"), Rule("2", "int8"))), progress=False)
    report = use_kernels(q)
    assert report.chosen == {"0": INT4, "2": INT8}
    assert report.counts() == {INT4: 1, INT8: 1}
    assert report.packed_bytes > 0
    release_kernels(q)
    assert kernel_name(q[0]) is None and kernel_name(q[2]) is None
    use_kernels(q)
    q[0].set_quantized_weight(q[0].quantized_weight())  # a new weight drops the packed copy
    assert kernel_name(q[0]) is None and kernel_name(q[2]) == INT8
    q.to(torch.float32)  # any _apply (device moves) drops every kernel
    assert kernel_name(q[2]) is None


def test_kernel_names_are_unique_and_every_kernel_declines_a_float_layer():
    assert len({k.name for k in KERNELS}) == len(KERNELS)
    assert all(k.why_not(nn.Linear(4, 4)) for k in KERNELS)  # type: ignore[arg-type]


# ---- embedding -----------------------------------------------------------------------------------


def _embedding(rows: int, dim: int, spec: str):
    from lowbit.nn import QuantEmbedding

    emb = nn.Embedding(rows, dim)
    with torch.no_grad():
        emb.weight.copy_(torch.randn(rows, dim, generator=torch.Generator().manual_seed(3)))
    return QuantEmbedding.from_float(emb, quantize_tensor(emb.weight.detach(), QuantSpec.parse(spec)))


@pytest.mark.parametrize("spec,dim", [("int4-g64-asym", 192), ("int8", 40), ("int4-g32", 100), ("int2-g64-asym", 64),
                                      ("nf4", 128), ("int3-g64-asym", 64), ("fp8-e4m3", 24)])
def test_embedding_kernel_returns_exactly_the_reference_rows(spec, dim):
    m = _embedding(37, dim, spec)
    ids = torch.tensor([[0, 36, 5, 5], [17, 2, 0, 31]])
    ref = m.reference(ids)
    assert _attach(m) == "embedding-rows"
    y = m(ids)
    assert y.shape == (2, 4, dim) and y.dtype == torch.float32
    assert torch.equal(y, ref)
    with pytest.raises(IndexError, match=r"\[0, 37\)"):
        m(torch.tensor([37]))


def test_embedding_kernel_declines_rows_that_do_not_start_on_a_byte_and_shared_scales():
    assert _attach(_embedding(10, 30, "int3-g64-asym")) is None  # 90 bits per row
    m = _embedding(16, 16, "int8-b8x8")
    report = use_kernels(m)
    assert report.chosen[""] is None and "shares scales across rows" in report.reasons[""]["embedding-rows"]


# ---- storage release -----------------------------------------------------------------------------


def test_keep_reference_false_holds_each_weight_once_and_refuses_what_needs_the_storage(tmp_path):
    from lowbit.io import save

    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 48))
    q = quantize(model, QuantPlan((Rule("0", "int4-g32-asym"), Rule("2", "int8"))), progress=False)
    x = _x(4, 64)
    before = q(x)
    use_kernels(q)
    fast = q(x)
    stored = q[0].qweight.numel()
    report = use_kernels(q, keep_reference=False)
    assert q[0].storage_released and q[0].qweight.numel() == 0 < stored
    assert report.chosen == {"0": INT4, "2": INT8}
    assert torch.equal(q(x), fast)  # the kernels still run, from their own copies
    assert _rel(q(x), before) < BF16_TOL
    assert use_kernels(q).chosen == report.chosen  # asking again keeps the kernels it has
    with pytest.raises(InputError, match="handed to its kernel"):
        q[0].reference(x)
    with pytest.raises(InputError, match="moving or casting"):
        q.to(torch.float32)
    with pytest.raises(InputError, match="cannot save: 0 and 1 more"):
        save(q, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    with pytest.raises(InputError, match="load the model again"):
        release_kernels(q)
    assert kernel_name(q[0]) == INT4  # nothing was released half way


def test_keep_reference_false_keeps_the_storage_of_a_kernel_that_reads_it():
    m = _embedding(20, 64, "int4-g64-asym")
    use_kernels(m, keep_reference=False)
    assert not m.storage_released and torch.equal(m(torch.tensor([3])), m.reference(torch.tensor([3])))


@pytest.mark.parametrize("aspec", ["int8-token", "int8-tensor", "int8-token-sfp32", "int8-token-sbf16"])
def test_w8a8_activation_codes_are_lowbits_own(aspec):
    """The kernel's one-pass symmetric quantizer gives the codes and scales of ``lowbit.formats.quantize``."""
    from lowbit.kernels.int8 import symmetric_codes

    spec = QuantSpec.parse(aspec)
    x = _x(37, 136) * 5
    x[3] = 0.0  # an all-zero token: scale 0, codes 0
    x[5, 7] = 1e-30  # a tiny one: the scale format's smallest step
    codes, scale = symmetric_codes(x, spec)
    q = quantize_tensor(x, spec)
    assert torch.equal(codes.to(torch.int16) + 128, q.codes.to(torch.int16))
    assert torch.equal(scale, q.scale.reshape(scale.shape).float())
    with pytest.raises(InputError, match="NaN"):
        symmetric_codes(torch.full((2, 8), float("nan")), spec)


@pytest.mark.parametrize("wspec, kernel", [("int8", "w8a8-int-mm"), ("int4-g32-asym", "w4a8-int-mm"),
                                           pytest.param("int8", "w8a8-avx2", marks=NATIVE),
                                           pytest.param("int4-g32-asym", "w4a8-avx2", marks=NATIVE)])
@pytest.mark.parametrize("aspec", ["int8-token", "int8-token-asym"])
def test_clipped_dynamic_activations_give_the_reference_codes_on_the_integer_kernels(monkeypatch, wspec, kernel,
                                                                                      aspec):
    monkeypatch.setattr(cpu_features, "has_vnni", lambda: False)  # w8a8-avx2 is for CPUs without it
    g = torch.Generator().manual_seed(4)
    w = torch.randn(24, 64, generator=g)
    act = ActivationQuant(QuantSpec.parse(aspec), dynamic=True, clip=0.8)
    m = QuantLinear.from_float(w, None, quantize_tensor(w, QuantSpec.parse(wspec)), act)
    x = _x(9, 64) * 3
    x[:, 5] *= 20  # outliers that the clipped range cuts
    ref = m.reference(x)
    assert _attach(m, kernel) == kernel
    assert _rel(m(x), ref) < 1e-5
    unclipped = QuantLinear.from_float(w, None, m.quantized_weight(), ActivationQuant(QuantSpec.parse(aspec)))
    assert _rel(unclipped.reference(x), ref) > 1e-3  # the clip changed the codes

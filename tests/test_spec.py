"""QuantSpec: presets, the compact grammar (parse/name round trip), dict round trip, validation messages."""

from __future__ import annotations

import itertools
import json

import pytest

from lowbit.errors import InputError
from lowbit.spec import FORMATS, KSCALE_MAX, PRESETS, SCALE_FORMATS, ActivationQuant, QuantSpec, parse_spec

_GRANULARITIES = [
    ("tensor", None, None),
    ("channel", None, None),
    ("token", None, None),
    ("group", 1, None),
    ("group", 16, None),
    ("group", 32, None),
    ("group", 64, None),
    ("group", 100, None),
    ("block", None, (1, 1)),
    ("block", None, (4, 8)),
    ("block", None, (16, 16)),
]


def _all_specs() -> list[QuantSpec]:
    """Every format x width x sym/asym (where valid) x granularity x scale storage: ~950 specs."""
    out = []
    for fmt in FORMATS:
        for bits in (range(2, 9) if fmt == "int" else [None]):
            for sym in ((True, False) if fmt == "int" else (True,)):
                for (gran, gs, bs), sf in itertools.product(_GRANULARITIES, SCALE_FORMATS):
                    if sf.startswith("k") and not _k_valid(fmt, sym, gran, gs, sf):
                        continue
                    out.append(QuantSpec(fmt, bits, sym, gran, gs, bs, sf))
    return out


def _k_valid(fmt, sym, gran, gs, sf) -> bool:
    """llama.cpp k-quant scales: integers in groups dividing 256, in one of the four layouts."""
    return fmt == "int" and gran == "group" and 256 % gs == 0 and (sf, sym) in KSCALE_MAX


def test_k_quant_scales_outside_their_layouts_are_refused():
    refused = 0
    for fmt in FORMATS:
        for sym in ((True, False) if fmt == "int" else (True,)):
            for (gran, gs, bs), sf in itertools.product(_GRANULARITIES, ("k4", "k6", "k8")):
                if not _k_valid(fmt, sym, gran, gs, sf):
                    with pytest.raises(InputError, match="k-quant"):
                        QuantSpec(fmt, 4 if fmt == "int" else None, sym, gran, gs, bs, sf)
                    refused += 1
    assert refused > 100


@pytest.mark.parametrize("ggml, name", [("q4_0", "int4-g32"), ("Q5_1", "int5-g32-asym"), ("q8_0", "int8-g32"),
                                        ("q2_k", "int2-g16-asym-sk4"), ("q3_k", "int3-g16-sk6"),
                                        ("Q4_K", "int4-g32-asym-sk6"), ("q5_k", "int5-g32-asym-sk6"),
                                        ("q6_k", "int6-g16-sk8")])
def test_llama_cpp_block_type_names_read_as_lowbit_specs(ggml, name):
    spec = QuantSpec.parse(ggml)
    assert spec.name == name and QuantSpec.parse(name) == spec
    assert spec.has_float_min == (name.endswith("asym-sk6") or name.endswith("asym-sk4"))


ALL_SPECS = _all_specs()


# ---- presets -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset", list(PRESETS))
def test_every_preset_parses_and_round_trips(preset):
    spec = QuantSpec.parse(preset)
    assert QuantSpec.parse(spec.name) == spec
    assert PRESETS[preset].strip(), "every preset carries a description"
    # the preset's short form is already the canonical name, except that '-ch' is the integer default
    assert spec.name == preset.replace("-ch", "")


def test_presets_mean_what_they_say():
    s = QuantSpec.parse("int4-g128-asym")
    assert (s.format, s.bits, s.symmetric, s.granularity, s.group_size, s.scale_format) == (
        "int", 4, False, "group", 128, "fp16")
    assert s.has_zero_point and not s.has_global_scale
    s = QuantSpec.parse("int8")
    assert (s.bits, s.symmetric, s.granularity) == (8, True, "channel") and not s.has_zero_point
    assert QuantSpec.parse("int8-tensor").granularity == "tensor"
    s = QuantSpec.parse("mxfp4")
    assert (s.format, s.bits, s.granularity, s.group_size, s.scale_format) == ("fp4_e2m1", 4, "group", 32, "e8m0")
    s = QuantSpec.parse("mxfp8")
    assert (s.format, s.bits, s.group_size, s.scale_format) == ("fp8_e4m3", 8, 32, "e8m0")
    s = QuantSpec.parse("nvfp4")
    assert (s.format, s.group_size, s.scale_format) == ("fp4_e2m1", 16, "fp8_e4m3") and s.has_global_scale
    s = QuantSpec.parse("nf4")
    assert (s.format, s.bits, s.group_size) == ("nf4", 4, 64)
    s = QuantSpec.parse("ternary")
    assert (s.format, s.bits, s.granularity) == ("ternary", 2, "channel")
    assert QuantSpec.parse("fp8-e5m2").format == "fp8_e5m2"


def test_aliases_case_and_underscores():
    assert QuantSpec.parse("fp8") == QuantSpec.parse("fp8-e4m3")
    assert QuantSpec.parse("fp4") == QuantSpec.parse("fp4-e2m1")
    assert QuantSpec.parse("INT4_G128_ASYM") == QuantSpec.parse("int4-g128-asym")
    assert QuantSpec.parse("  int8 ") == QuantSpec.parse("int8")
    assert QuantSpec.parse("int4-asym-g32") == QuantSpec.parse("int4-g32-asym")  # modifiers in any order
    assert QuantSpec.parse("int8-sym") == QuantSpec.parse("int8")
    assert QuantSpec.parse("int4-g64-ch").granularity == "channel"  # the last granularity word wins
    assert QuantSpec.parse("nvfp4-sfp16").scale_format == "fp16"
    assert QuantSpec.parse("int4-sfp8").scale_format == "fp8_e4m3"


# ---- the grammar round trip over a large generated set ---------------------------------------------------


def test_generated_specs_cover_the_space():
    assert len(ALL_SPECS) > 900
    assert len({s.name for s in ALL_SPECS}) == len(ALL_SPECS), "two different specs share a name"


@pytest.mark.parametrize("fmt", FORMATS)
def test_parse_name_round_trip(fmt):
    specs = [s for s in ALL_SPECS if s.format == fmt]
    assert specs
    for s in specs:
        assert QuantSpec.parse(s.name) == s, s


def test_name_is_short_for_defaults():
    assert QuantSpec("int", 8).name == "int8"
    assert QuantSpec("int", 4, False, "group", 128).name == "int4-g128-asym"
    assert QuantSpec("fp4_e2m1", granularity="group", group_size=32, scale_format="e8m0").name == "mxfp4"
    assert QuantSpec("fp4_e2m1", granularity="group", group_size=16, scale_format="fp8_e4m3").name == "nvfp4"
    assert QuantSpec("int", 4, granularity="block", block_shape=(4, 8)).name == "int4-b4x8"


@pytest.mark.parametrize("spec", ALL_SPECS[::7], ids=lambda s: s.name)
def test_dict_round_trip_is_json(spec):
    d = spec.to_dict()
    assert QuantSpec.from_dict(json.loads(json.dumps(d))) == spec


def test_from_dict_rejects_unknown_fields():
    d = QuantSpec.parse("int8").to_dict() | {"bitz": 4}
    with pytest.raises(InputError, match="bitz"):
        QuantSpec.from_dict(d)


def test_specs_are_frozen_and_hashable():
    s = QuantSpec.parse("int4-g32")
    with pytest.raises(AttributeError):
        s.bits = 3  # type: ignore[misc]
    assert len({s, QuantSpec.parse("int4-g32"), QuantSpec.parse("int4-g64")}) == 2
    assert s.with_(group_size=64) == QuantSpec.parse("int4-g64")


def test_derived_facts():
    assert QuantSpec.parse("nvfp4").scale_bits == 8
    assert QuantSpec.parse("int8").scale_bits == 16
    assert QuantSpec.parse("fp8").scale_bits == 32
    assert QuantSpec.parse("int4-tensor").block(5, 7) == (5, 7)
    assert QuantSpec.parse("int4").block(5, 7) == (1, 7)
    assert QuantSpec.parse("int8-token").block(5, 7) == (1, 7)
    assert QuantSpec.parse("int4-g3").block(5, 7) == (1, 3)
    assert QuantSpec.parse("int4-b2x4").block(5, 7) == (2, 4)


# ---- invalid input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, words",
    [
        ("int9", ["int9", "int2..int8"]),
        ("int1", ["int1", "int2..int8"]),
        ("int4-g0", ["int4-g0", "group_size"]),
        ("fp8-asym", ["fp8-asym", "symmetric"]),
        ("nf4-asym", ["nf4-asym", "symmetric"]),
        ("int4-gx", ["int4-gx", "'gx'"]),
        ("nvfp4-b0x2", ["nvfp4-b0x2", "block_shape"]),
        ("int4-b4", ["'b4'"]),
        ("int4-sfoo", ["'sfoo'"]),
        ("int4--g32", ["int4--g32"]),
        ("foo", ["'foo'", "Presets"]),
        ("", ["empty", "int8"]),
        ("   ", ["empty"]),
    ],
)
def test_bad_scheme_strings_raise_with_a_helpful_message(text, words):
    with pytest.raises(InputError) as e:
        parse_spec(text)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("bad", [None, 4, b"int8"])
def test_non_string_scheme(bad):
    with pytest.raises(InputError):
        parse_spec(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "kwargs, words",
    [
        (dict(format="int4"), ["int4", "fp8_e4m3"]),
        (dict(format="int", bits=None), ["2..8"]),
        (dict(format="int", bits=9), ["2..8"]),
        (dict(format="int", bits=1), ["2..8"]),
        (dict(format="nf4", bits=8), ["4 bits"]),
        (dict(format="fp8_e4m3", symmetric=False), ["symmetric"]),
        (dict(format="int", bits=4, granularity="row"), ["'row'", "channel"]),
        (dict(format="int", bits=4, granularity="group"), ["group_size"]),
        (dict(format="int", bits=4, granularity="group", group_size=-1), ["group_size"]),
        (dict(format="int", bits=4, group_size=32), ["group_size", "'channel'"]),
        (dict(format="int", bits=4, granularity="block"), ["block_shape"]),
        (dict(format="int", bits=4, granularity="block", block_shape=(4,)), ["block_shape"]),
        (dict(format="int", bits=4, block_shape=(4, 4)), ["block_shape"]),
        (dict(format="int", bits=4, scale_format="fp64"), ["fp64", "e8m0"]),
    ],
)
def test_invalid_spec_fields(kwargs, words):
    with pytest.raises(InputError) as e:
        QuantSpec(**kwargs)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_input_error_is_a_value_error():
    with pytest.raises(ValueError):
        parse_spec("int9")


# ---- activation quantization ---------------------------------------------------------------------------


def test_activation_quant_static_needs_per_tensor():
    a = ActivationQuant("int8-tensor", dynamic=False)
    assert a.spec == QuantSpec.parse("int8-tensor") and a.name == "int8-tensor:static-minmax"
    with pytest.raises(InputError, match="per-tensor"):
        ActivationQuant(QuantSpec.parse("int8-token"), dynamic=False)
    assert ActivationQuant("int8-token").name == "int8-token:dynamic"


@pytest.mark.parametrize("act", [ActivationQuant("int8-token"), ActivationQuant("int8-tensor", False, "percentile"),
                                 ActivationQuant("fp8-tensor", False)])
def test_activation_quant_dict_round_trip(act):
    assert ActivationQuant.from_dict(json.loads(json.dumps(act.to_dict()))) == act


def test_activation_quant_from_dict_errors():
    assert ActivationQuant.from_dict("int8-token") == ActivationQuant("int8-token")
    with pytest.raises(InputError, match="spec"):
        ActivationQuant.from_dict({"dynamic": True})
    with pytest.raises(InputError, match="dynamc"):
        ActivationQuant.from_dict({"spec": "int8-token", "dynamc": True})


def test_activation_and_kv_clip_ratios():
    from lowbit.spec import ActivationQuant, KVCacheQuant

    a = ActivationQuant.from_dict({"spec": "int4-token-asym", "clip": 0.9})
    assert a.clip == 0.9 and a.name == "int4-token-asym:dynamic-clip0.9" and ActivationQuant.from_dict(a.to_dict()) == a
    assert "clip" not in ActivationQuant.from_dict("int8-token").to_dict()  # unset: the dict is as before
    for bad in (0, 1.5, "0.9", True):
        with pytest.raises(InputError, match="'clip' must be a number in \\(0, 1\\]"):
            ActivationQuant.from_dict({"spec": "int8-token", "clip": bad})
    with pytest.raises(InputError, match="clip' applies to dynamic scales"):
        ActivationQuant.from_dict({"spec": "int8-tensor", "dynamic": False, "clip": 0.9})
    kv = KVCacheQuant.from_dict({"spec": "int4-token-asym", "rotate": True, "clip": 0.95})
    assert kv.clip == 0.95 and KVCacheQuant.from_dict(kv.to_dict()) == kv
    with pytest.raises(InputError, match="kv-cache 'clip'"):
        KVCacheQuant.from_dict({"spec": "int4-token", "clip": -1})


def test_a_clipped_dynamic_range_saturates_the_outliers():
    import torch

    from lowbit.formats import fake_quantize, fake_quantize_dynamic

    x = torch.tensor([[0.1, -0.2, 0.3, 10.0]])
    spec = parse_spec("int4-token")
    assert torch.equal(fake_quantize_dynamic(x, spec), fake_quantize(x, spec))
    clipped = fake_quantize_dynamic(x, spec, 0.1)
    assert float(clipped[0, 3]) <= 1.0 * 1.001  # cut to a tenth of the range (fp16 scale rounding)
    assert float((clipped[0, :3] - x[0, :3]).abs().max()) < float((fake_quantize(x, spec)[0, :3] - x[0, :3]).abs().max())

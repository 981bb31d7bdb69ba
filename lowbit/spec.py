"""QuantSpec: what a quantized number is.

A spec names a number format (integer, FP8, FP4, NF4, ternary), its width, whether integers carry a zero
point, how many values share one scale (the granularity) and how that scale is stored. It says nothing
about how values are chosen (that is an algorithm) or how they are laid out in memory (that is a module in
``lowbit.nn``).

Granularity is defined on the 2-D view of a tensor: a weight of shape ``(out, in, *kernel)`` is seen as
``(out, in * prod(kernel))``; an activation of shape ``(..., features)`` as ``(tokens, features)``.

=========  =================================================================
tensor     one scale for the whole tensor
channel    one scale per row (per output channel of a weight)
token      one scale per row of an activation (per token); same geometry as channel
group      one scale per ``group_size`` consecutive elements of a row
block      one scale per ``block_shape = (rows, cols)`` tile
=========  =================================================================

When a row's length is not a multiple of ``group_size`` the last group of each row is shorter and gets a
scale of its own (nothing is skipped, nothing silently regrouped); ``lowbit inspect`` shows it.

Specs have a compact text form used on the command line and in recipes, e.g. ``int4-g128-asym``,
``int8`` (symmetric, per channel), ``fp8-e4m3``, ``mxfp4``, ``nvfp4``, ``nf4-g64``, ``ternary``.
``QuantSpec.parse(spec.name) == spec`` for every spec.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace
from typing import Any

from lowbit.errors import InputError

# names of lowbit.observers.OBSERVERS, checked when a spec is read (a test keeps the two in step)
OBSERVER_NAMES = ("minmax", "percentile", "mse", "histogram")
FORMATS = ("int", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "nf4", "ternary")
GRANULARITIES = ("tensor", "channel", "token", "group", "block")
SCALE_FORMATS = ("fp32", "fp16", "bf16", "e8m0", "fp8_e4m3", "k4", "k6", "k8")
# "kN": llama.cpp's k-quant scales. Each tile's scale is an N-bit integer times one fp16 scale per SUPER_BLOCK
# elements of the row; with a zero point, the tile's offset is stored the same way (a float minimum, not an
# integer zero point). The largest integer a tile scale takes (k6 for symmetric codes: 6-bit signed, positive
# half; k8: int8, positive half)
SUPER_BLOCK = 256
KSCALE_MAX = {("k4", False): 15, ("k6", False): 63, ("k6", True): 31, ("k8", True): 127}
# llama.cpp's block types as lowbit specs, accepted by parse_spec (q4_k, Q4_K or q4-k)
GGML_NAMES = {"q4-0": "int4-g32", "q4-1": "int4-g32-asym", "q5-0": "int5-g32", "q5-1": "int5-g32-asym",
              "q8-0": "int8-g32", "q2-k": "int2-g16-asym-sk4", "q3-k": "int3-g16-sk6", "q4-k": "int4-g32-asym-sk6",
              "q5-k": "int5-g32-asym-sk6", "q6-k": "int6-g16-sk8"}

# storage width in bits of one element, for the formats whose width is fixed
_FIXED_BITS = {"fp8_e4m3": 8, "fp8_e5m2": 8, "fp4_e2m1": 4, "nf4": 4, "ternary": 2}
_SCALE_BITS = {"fp32": 32, "fp16": 16, "bf16": 16, "e8m0": 8, "fp8_e4m3": 8, "k4": 4, "k6": 6, "k8": 8}


@dataclass(frozen=True)
class QuantSpec:
    """A number format and its scaling granularity.

    Attributes:
        format: one of ``FORMATS``.
        bits: element width; 2-8 for ``int``, fixed for the other formats (may be left as None).
        symmetric: integers without zero point (codes centred on 0). Non-integer formats are always symmetric.
        granularity: one of ``GRANULARITIES`` (see module docstring).
        group_size: elements per scale along a row, for ``granularity="group"``.
        block_shape: ``(rows, cols)`` per scale, for ``granularity="block"``.
        scale_format: how scales are stored: ``fp32``, ``fp16``, ``bf16``, ``e8m0`` (power of two, as in MX)
            or ``fp8_e4m3`` (as in NVFP4, together with one fp32 scale per tensor).
    """

    format: str = "int"
    bits: int | None = None
    symmetric: bool = True
    granularity: str = "channel"
    group_size: int | None = None
    block_shape: tuple[int, int] | None = None
    scale_format: str = "fp16"

    def __post_init__(self) -> None:
        _check_types(self)
        if self.format not in FORMATS:
            raise InputError(f"unknown number format {self.format!r}; expected one of {', '.join(FORMATS)}")
        if self.format == "int":
            if self.bits is None or not isinstance(self.bits, int) or not 2 <= self.bits <= 8:
                raise InputError(f"integer specs need bits in 2..8, got {self.bits!r}")
        else:
            fixed = _FIXED_BITS[self.format]
            if self.bits not in (None, fixed):
                raise InputError(f"format {self.format} has {fixed} bits, got bits={self.bits}")
            object.__setattr__(self, "bits", fixed)
            if not self.symmetric:
                raise InputError(f"format {self.format} is symmetric (scale only, no zero point)")
        if self.granularity not in GRANULARITIES:
            raise InputError(
                f"unknown granularity {self.granularity!r}; expected one of {', '.join(GRANULARITIES)}"
            )
        if self.granularity == "group":
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise InputError(f"granularity 'group' needs a positive group_size, got {self.group_size!r}")
        elif self.group_size is not None:
            raise InputError(f"group_size is only meaningful with granularity 'group' (got {self.granularity!r})")
        if self.granularity == "block":
            bs = self.block_shape
            if bs is None or len(bs) != 2 or not all(isinstance(b, int) and b >= 1 for b in bs):
                raise InputError(f"granularity 'block' needs block_shape=(rows, cols), got {bs!r}")
            object.__setattr__(self, "block_shape", (int(bs[0]), int(bs[1])))
        elif self.block_shape is not None:
            raise InputError("block_shape is only meaningful with granularity 'block'")
        if self.scale_format not in SCALE_FORMATS:
            raise InputError(
                f"unknown scale_format {self.scale_format!r}; expected one of {', '.join(SCALE_FORMATS)}"
            )
        if self.has_super_scale:
            if self.format != "int" or self.granularity != "group" or SUPER_BLOCK % self.group_size:
                raise InputError(f"scale_format {self.scale_format} (k-quant scales per {SUPER_BLOCK} elements) needs "
                                 f"integers in groups dividing {SUPER_BLOCK}")
            if (self.scale_format, self.symmetric) not in KSCALE_MAX:
                kinds = ", ".join(f"{f} {'symmetric' if sym else 'with zero point'}" for f, sym in KSCALE_MAX)
                raise InputError(f"scale_format {self.scale_format} with "
                                 f"{'symmetric codes' if self.symmetric else 'a zero point'} is not a k-quant "
                                 f"layout (there are: {kinds})")

    # ---- derived facts -------------------------------------------------------------------------

    @property
    def has_zero_point(self) -> bool:
        return self.format == "int" and not self.symmetric

    @property
    def has_global_scale(self) -> bool:
        """NVFP4-style: fp8 block scales relative to one fp32 scale per tensor."""
        return self.scale_format == "fp8_e4m3"

    @property
    def has_super_scale(self) -> bool:
        """llama.cpp k-quant style: integer tile scales (and minimums) times an fp16 scale per 256 elements."""
        return self.scale_format.startswith("k")

    @property
    def tiles_per_super(self) -> int:
        """k-quant scales: the groups (tiles) of a row that share one fp16 scale."""
        return SUPER_BLOCK // self.group_size

    @property
    def has_float_min(self) -> bool:
        """Asymmetric with a float minimum per tile (``code * scale - min``) instead of an integer zero point."""
        return self.has_super_scale and not self.symmetric

    @property
    def scale_bits(self) -> int:
        return _SCALE_BITS[self.scale_format]

    def block(self, rows: int, cols: int) -> tuple[int, int]:
        """Shape ``(rows, cols)`` of the tile of a ``rows x cols`` matrix that shares one scale."""
        if self.granularity == "tensor":
            return (max(rows, 1), max(cols, 1))
        if self.granularity in ("channel", "token"):
            return (1, max(cols, 1))
        if self.granularity == "group":
            return (1, self.group_size)
        return self.block_shape  # type: ignore[return-value]

    # ---- text form -----------------------------------------------------------------------------

    @property
    def name(self) -> str:
        """Compact text form; ``QuantSpec.parse(spec.name) == spec``."""
        return spec_name(self)

    @classmethod
    def parse(cls, text: str) -> "QuantSpec":
        return parse_spec(text)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["block_shape"] is not None:
            d["block_shape"] = list(d["block_shape"])
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "QuantSpec":
        if not isinstance(d, dict):
            raise InputError(f"a QuantSpec is a mapping of its fields, got {type(d).__name__}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise InputError(f"unknown QuantSpec field(s) {sorted(unknown)}; known: {sorted(known)}")
        d = dict(d)
        if isinstance(d.get("block_shape"), list):
            d["block_shape"] = tuple(d["block_shape"])
        return cls(**d)

    def with_(self, **changes: Any) -> "QuantSpec":
        return replace(self, **changes)


def _check_types(spec: QuantSpec) -> None:
    """Field types first (a spec may come from a file): names are strings, flags booleans, sizes integers."""
    for f in ("format", "granularity", "scale_format"):
        if not isinstance(getattr(spec, f), str):
            raise InputError(f"QuantSpec {f} must be a string, got {getattr(spec, f)!r}")
    if not isinstance(spec.symmetric, bool):
        raise InputError(f"QuantSpec symmetric must be true or false, got {spec.symmetric!r}")
    for f in ("bits", "group_size"):
        v = getattr(spec, f)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise InputError(f"QuantSpec {f} must be an integer or null, got {v!r}")
    bs = spec.block_shape
    if bs is not None and not (isinstance(bs, (tuple, list)) and len(bs) == 2
                               and all(isinstance(b, int) and not isinstance(b, bool) for b in bs)):
        raise InputError(f"QuantSpec block_shape must be two integers (rows, cols) or null, got {bs!r}")


# ---- named presets and the compact grammar -------------------------------------------------------

# Format words of the compact grammar -> the spec they start from.
_WORDS: dict[str, QuantSpec] = {
    "fp8-e4m3": QuantSpec("fp8_e4m3", granularity="channel", scale_format="fp32"),
    "fp8-e5m2": QuantSpec("fp8_e5m2", granularity="channel", scale_format="fp32"),
    "fp4-e2m1": QuantSpec("fp4_e2m1", granularity="group", group_size=32, scale_format="fp16"),
    "mxfp8": QuantSpec("fp8_e4m3", granularity="group", group_size=32, scale_format="e8m0"),
    "mxfp8-e5m2": QuantSpec("fp8_e5m2", granularity="group", group_size=32, scale_format="e8m0"),
    "mxfp4": QuantSpec("fp4_e2m1", granularity="group", group_size=32, scale_format="e8m0"),
    "nvfp4": QuantSpec("fp4_e2m1", granularity="group", group_size=16, scale_format="fp8_e4m3"),
    "nf4": QuantSpec("nf4", granularity="group", group_size=64, scale_format="fp16"),
    "ternary": QuantSpec("ternary", granularity="channel", scale_format="fp16"),
}
_ALIASES = {"fp8": "fp8-e4m3", "fp4": "fp4-e2m1"}

PRESETS: dict[str, str] = {
    "int8": "8-bit integer, symmetric, per output channel",
    "int8-tensor": "8-bit integer, symmetric, one scale per tensor",
    "int6": "6-bit integer, symmetric, per channel",
    "int4-ch": "4-bit integer, symmetric, per channel",
    "int4-g128-asym": "4-bit integer with zero point, groups of 128",
    "int4-g64-asym": "4-bit integer with zero point, groups of 64",
    "int4-g32-asym": "4-bit integer with zero point, groups of 32",
    "int3-g64-asym": "3-bit integer with zero point, groups of 64",
    "int2-g64-asym": "2-bit integer with zero point, groups of 64",
    "ternary": "{-1, 0, +1} x per-channel scale (absmean)",
    "fp8-e4m3": "FP8 E4M3, per-channel fp32 scale",
    "fp8-e5m2": "FP8 E5M2, per-channel fp32 scale",
    "mxfp8": "OCP MX: FP8 E4M3 elements, power-of-two (E8M0) scale per 32",
    "mxfp4": "OCP MX: FP4 E2M1 elements, power-of-two (E8M0) scale per 32",
    "nvfp4": "FP4 E2M1 elements, FP8 E4M3 scale per 16, fp32 scale per tensor",
    "nf4": "NormalFloat-4 codebook, absmax scale per 64",
}

_INT_RE = re.compile(r"int([2-8])")
_GROUP_RE = re.compile(r"g(\d+)")
_BLOCK_RE = re.compile(r"b(\d+)x(\d+)")
_SCALE_RE = re.compile(r"s(fp32|fp16|bf16|e8m0|fp8|k4|k6|k8)")


def parse_spec(text: str) -> QuantSpec:
    """Parse the compact form: ``FORMAT[-GRANULARITY][-sym|-asym][-sSCALE]``.

    FORMAT is ``int2`` .. ``int8`` or one of the words ``fp8-e4m3``, ``fp8-e5m2``, ``fp4-e2m1``, ``mxfp8``,
    ``mxfp4``, ``nvfp4``, ``nf4``, ``ternary`` (``fp8``/``fp4`` are short for the first E4M3/E2M1 forms).
    GRANULARITY is ``ch`` (per channel, the default for integers), ``tensor``, ``token``, ``gN`` (groups
    of N) or ``bRxC`` (2-D blocks). Integers are symmetric unless ``asym`` is given. ``sSCALE`` picks the
    scale storage (``sfp32``, ``sfp16``, ``sbf16``, ``se8m0``, ``sfp8``, or llama.cpp's k-quant scales ``sk4``,
    ``sk6``, ``sk8``). llama.cpp's block type names (``q4_0``, ``q5_1``, ``q4_k``, ``q6_k`` ...: ``GGML_NAMES``)
    are read as the lowbit spec they are.
    """
    if not isinstance(text, str) or not text.strip():
        raise InputError(f"empty quantization scheme {text!r}; try one of: {', '.join(PRESETS)}")
    raw = text.strip().lower().replace("_", "-")
    raw = GGML_NAMES.get(raw, raw)
    words = raw.split("-")
    base: QuantSpec | None = None
    rest: list[str] = []
    m = _INT_RE.fullmatch(words[0])
    if m:
        base = QuantSpec("int", bits=int(m.group(1)), symmetric=True, granularity="channel")
        rest = words[1:]
    else:
        for n in (2, 1):  # longest word first: 'fp8-e5m2' before 'fp8'
            head = "-".join(words[:n])
            head = _ALIASES.get(head, head) if n == 1 else head
            if head in _WORDS:
                base, rest = _WORDS[head], words[n:]
                break
    if base is None:
        raise InputError(
            f"unknown quantization scheme {text!r}: format {words[0]!r} is not one of "
            f"int2..int8, {', '.join(_WORDS)}. Presets: {', '.join(PRESETS)}"
        )
    fields: dict[str, Any] = base.to_dict()
    fields["block_shape"] = base.block_shape
    for w in rest:
        if w in ("ch", "channel", "tensor", "token"):
            fields.update(granularity="channel" if w == "ch" else w, group_size=None, block_shape=None)
        elif w in ("sym", "asym"):
            fields["symmetric"] = w == "sym"
        elif (g := _GROUP_RE.fullmatch(w)) is not None:
            fields.update(granularity="group", group_size=int(g.group(1)), block_shape=None)
        elif (b := _BLOCK_RE.fullmatch(w)) is not None:
            fields.update(granularity="block", group_size=None, block_shape=(int(b.group(1)), int(b.group(2))))
        elif (s := _SCALE_RE.fullmatch(w)) is not None:
            fields["scale_format"] = "fp8_e4m3" if s.group(1) == "fp8" else s.group(1)
        else:
            raise InputError(
                f"in quantization scheme {text!r}: cannot read {w!r}; expected ch, tensor, token, gN, "
                f"bRxC, sym, asym or sSCALE (e.g. int4-g128-asym)"
            )
    try:
        return QuantSpec(**fields)
    except InputError as e:
        raise InputError(f"in quantization scheme {text!r}: {e}") from None


def spec_name(spec: QuantSpec) -> str:
    """The compact text form of ``spec`` (the inverse of :func:`parse_spec`)."""
    if spec.format == "int":
        head = f"int{spec.bits}"
        default_scale = "fp16"
    else:
        # shortest word whose defaults match this spec's element format
        head, default_scale = _format_word(spec)
    parts = [head]
    base = parse_spec(head)
    if (spec.granularity, spec.group_size, spec.block_shape) != (base.granularity, base.group_size, base.block_shape):
        if spec.granularity == "group":
            parts.append(f"g{spec.group_size}")
        elif spec.granularity == "block":
            parts.append(f"b{spec.block_shape[0]}x{spec.block_shape[1]}")  # type: ignore[index]
        else:
            parts.append("ch" if spec.granularity == "channel" else spec.granularity)
    if spec.format == "int" and not spec.symmetric:
        parts.append("asym")
    if spec.scale_format != default_scale:
        parts.append("s" + ("fp8" if spec.scale_format == "fp8_e4m3" else spec.scale_format))
    return "-".join(parts)


def _format_word(spec: QuantSpec) -> tuple[str, str]:
    candidates = [(w, s) for w, s in _WORDS.items() if s.format == spec.format]
    # prefer the word that already matches granularity and scale storage, so names stay short
    for w, s in candidates:
        if (s.granularity, s.group_size, s.scale_format) == (spec.granularity, spec.group_size, spec.scale_format):
            return w, s.scale_format
    for w, s in candidates:
        if s.scale_format == spec.scale_format:
            return w, s.scale_format
    w, s = candidates[0]
    return w, s.scale_format


@dataclass(frozen=True)
class ActivationQuant:
    """How a module's input activations are quantized.

    Attributes:
        spec: the number format; granularity applies to the ``(tokens, features)`` view of the input.
        dynamic: scales computed from each input at run time (any granularity), or fixed from calibration
            data (``dynamic=False``, per-tensor granularity only).
        observer: for static scales, the observer that sets the range: ``minmax``, ``percentile``, ``mse``
            or ``histogram``. A mapping ``{name: percentile, percentile: 99.9}`` (as recipes write it) names
            the observer and its settings.
        observer_settings: the observer's settings (``lowbit.observers.make_observer`` keywords), as sorted
            ``(name, number)`` pairs; a mapping is accepted.
        clip: for dynamic scales, the fraction of each token's (or tensor's) range kept, in (0, 1]; values
            beyond are clipped (QuaRot quantizes 4-bit activations with 0.9, section 5).
    """

    spec: QuantSpec
    dynamic: bool = True
    observer: str = "minmax"
    clip: float = 1.0
    observer_settings: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        if isinstance(self.spec, str):
            object.__setattr__(self, "spec", parse_spec(self.spec))
        if not isinstance(self.dynamic, bool):
            raise InputError(f"activation 'dynamic' must be true or false, got {self.dynamic!r}")
        settings = dict(self.observer_settings) if isinstance(self.observer_settings, (dict, tuple, list)) else None
        if isinstance(self.observer, dict):  # {name: percentile, percentile: 99.9}
            settings = {**(settings or {}), **{k: v for k, v in self.observer.items() if k != "name"}}
            object.__setattr__(self, "observer", self.observer.get("name"))
        if settings is None or not all(isinstance(k, str) and isinstance(v, (int, float)) and not isinstance(v, bool)
                                       for k, v in settings.items()):
            raise InputError(f"activation observer settings must map names to numbers (e.g. {{name: percentile, "
                             f"percentile: 99.9}}), got {self.observer_settings!r}")
        object.__setattr__(self, "observer_settings", tuple(sorted((k, float(v)) for k, v in settings.items())))
        if settings and self.dynamic:
            raise InputError("activation observer settings apply to static ranges (dynamic: false)")
        if not isinstance(self.spec, QuantSpec):
            raise InputError(f"activation spec must be a scheme name or a QuantSpec, got {self.spec!r}")
        if not isinstance(self.observer, str) or self.observer not in OBSERVER_NAMES:
            raise InputError(f"unknown activation observer {self.observer!r}; known: {', '.join(OBSERVER_NAMES)}")
        if not self.dynamic and self.spec.granularity != "tensor":
            raise InputError(
                f"static activation quantization needs per-tensor granularity, got {self.spec.name}; "
                f"use a '-tensor' scheme or dynamic: true"
            )
        _check_clip(self.clip, "activation")
        if self.clip != 1.0 and not self.dynamic:
            raise InputError("activation 'clip' applies to dynamic scales; a static range comes from its observer")

    @property
    def name(self) -> str:
        clip = "" if self.clip == 1.0 else f"-clip{self.clip:g}"
        settings = "".join(f"-{k}{v:g}" for k, v in self.observer_settings)
        return f"{self.spec.name}:{'dynamic' if self.dynamic else 'static-' + self.observer + settings}{clip}"

    def to_dict(self) -> dict[str, Any]:
        observer: Any = {"name": self.observer, **dict(self.observer_settings)} if self.observer_settings \
            else self.observer  # the plain name when there are no settings: older records stay as they were
        d = {"spec": self.spec.name, "dynamic": self.dynamic, "observer": observer}
        if self.clip != 1.0:  # only when set: older records and run keys stay as they were
            d["clip"] = self.clip
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> "ActivationQuant":
        if isinstance(d, str):
            return cls(parse_spec(d))
        if not isinstance(d, dict):
            raise InputError(f"activation settings are a scheme name or a mapping, got {type(d).__name__}")
        unknown = set(d) - {"spec", "dynamic", "observer", "clip"}
        if unknown:
            raise InputError(f"unknown activation field(s) {sorted(unknown)}; known: spec, dynamic, observer, clip")
        if "spec" not in d:
            raise InputError("activation settings need a 'spec' (e.g. int8-tensor)")
        spec = d["spec"] if isinstance(d["spec"], QuantSpec) else (
            parse_spec(d["spec"]) if isinstance(d["spec"], str) else QuantSpec.from_dict(d["spec"])
        )
        return cls(spec, d.get("dynamic", True), d.get("observer", "minmax"), d.get("clip", 1.0))


@dataclass(frozen=True)
class KVCacheQuant:
    """How the keys and values a model's attention caches are quantized (``lowbit.nn.kv_cache``).

    Attributes:
        spec: the number format on the ``(tokens x heads, head_dim)`` view of the keys and of the values:
            ``token`` granularity is one scale per head and token (``int8-token``), ``gN`` groups of N
            channels of one head and token (``int4-g32-asym``). Scales are always computed on the fly.
        rotate: multiply each head's keys and values by a normalized Hadamard of the head width before
            quantizing (and by its transpose after): the rotation QuaRot applies to queries and keys and to
            the values (section 4), which spreads outlier channels before they are rounded.
        clip: the fraction of each row's range kept, in (0, 1] (QuaRot: 0.95 for a 4-bit cache).
    """

    spec: QuantSpec
    rotate: bool = False
    clip: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.spec, str):
            object.__setattr__(self, "spec", parse_spec(self.spec))
        if not isinstance(self.spec, QuantSpec):
            raise InputError(f"kv-cache spec must be a scheme name or a QuantSpec, got {self.spec!r}")
        if self.spec.granularity not in ("token", "group", "tensor"):
            raise InputError(f"kv-cache format {self.spec.name}: use per token and head ('-token'), groups of a "
                             f"head's channels ('-gN') or per tensor, not {self.spec.granularity}")
        if not isinstance(self.rotate, bool):
            raise InputError(f"kv-cache 'rotate' must be true or false, got {self.rotate!r}")
        _check_clip(self.clip, "kv-cache")

    @property
    def name(self) -> str:
        return self.spec.name + ("+rot" if self.rotate else "") + ("" if self.clip == 1.0 else f"-clip{self.clip:g}")

    def to_dict(self) -> dict[str, Any]:
        d = {"spec": self.spec.name, "rotate": self.rotate}
        if self.clip != 1.0:
            d["clip"] = self.clip
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any] | str) -> "KVCacheQuant":
        if isinstance(d, str):
            return cls(parse_spec(d))
        if not isinstance(d, dict):
            raise InputError(f"kv-cache settings are a scheme name or a mapping, got {type(d).__name__}")
        unknown = set(d) - {"spec", "rotate", "clip"}
        if unknown:
            raise InputError(f"unknown kv-cache field(s) {sorted(unknown)}; known: spec, rotate, clip")
        if "spec" not in d:
            raise InputError("kv-cache settings need a 'spec' (e.g. int8-token)")
        spec = d["spec"] if isinstance(d["spec"], QuantSpec) else (
            parse_spec(d["spec"]) if isinstance(d["spec"], str) else QuantSpec.from_dict(d["spec"]))
        return cls(spec, d.get("rotate", False), d.get("clip", 1.0))


def _check_clip(clip: Any, what: str) -> None:
    if isinstance(clip, bool) or not isinstance(clip, (int, float)) or not 0.0 < float(clip) <= 1.0:
        raise InputError(f"{what} 'clip' must be a number in (0, 1], got {clip!r}")

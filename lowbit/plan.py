"""QuantPlan: which modules get which format and algorithm. Mixed precision lives here.

A plan is an ordered list of rules, each mapping a module-name pattern to a weight spec (or ``None``: keep
float), an algorithm and optional activation quantization, plus a list of skip patterns. For each
quantizable module (``lowbit.nn.convert.SUPPORTED``), the skip list is checked first, then the rules in
order; the first match wins. Patterns are shell globs over the module's dotted name (``*`` also crosses
dots, so ``*.mlp.*`` matches every MLP linear) or, with a ``re:`` prefix, full-match regular expressions.
Skip patterns may also name a module class with ``type:`` (``type:Embedding`` skips every ``nn.Embedding``
and subclass, whatever the model calls it: ``embed_tokens``, ``wte``, ``word_embeddings``), or a role with
``role:`` (``lowbit.nn.roles``: ``role:head`` is the output head whatever its name, ``lm_head``, ``proj_out``,
``cls.predictions.decoder``; ``role:embedding`` the input embedding). The default skip keeps the head, the
input embedding and every other embedding in float.

Recipes are plans written as YAML::

    skip: ["role:head", "role:embedding", "type:Embedding"]
    rules:
      - pattern: "*.down_proj"
        weight: int8
      - pattern: "*"
        weight: int4-g128-asym
        method: {name: rtn, clip_search: true}
        act: {spec: int8-token, dynamic: true}
        bias_correction: false
    transforms: [fuse_norms]     # optional: float equivalence transforms applied first (lowbit.transforms)
    kv: {spec: int8-token}       # optional: KV-cache quantization of the model's attention (lowbit.nn.kv_cache)
    reconstruct: {iters: 1000}   # optional: block reconstruction of the rounding (BRECQ/QDrop, lowbit.algorithms.brecq)
    inputs:                      # optional: inputs of modules without weights (lowbit.nn.input_quant)
      - {pattern: "*.softmax", act: {spec: int8-tensor-asym, dynamic: false}}
"""

from __future__ import annotations

import fnmatch
import os
import re
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lowbit.algorithms import Algorithm, RTN, make_algorithm
from lowbit.algorithms.brecq import Reconstruction
from lowbit.errors import InputError
from lowbit.nn.input_quant import InputQuant
from lowbit.nn.roles import HEAD_NAME, ROLES
from lowbit.spec import ActivationQuant, KVCacheQuant, QuantSpec, parse_spec
from lowbit.transforms import NEEDS_DATA, check_transforms

DEFAULT_SKIP = ("role:head", "role:embedding", "type:Embedding")
MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few rules; anything larger is the wrong file (or /dev/zero)


def _check_role(pattern: str, where: str) -> None:
    if pattern.startswith("role:") and pattern[5:] not in ROLES:
        raise InputError(f"{where} {pattern!r}: unknown role {pattern[5:]!r}; roles are {', '.join(ROLES)}")


def _match(pattern: str, name: str, module: Any = None, roles: dict[str, str] | None = None) -> bool:
    if pattern.startswith("role:"):
        if roles is None:  # no model to ask: the head is what a model without get_output_embeddings calls it
            return pattern == "role:head" and (name == HEAD_NAME or name.endswith("." + HEAD_NAME))
        return roles.get(name) == pattern[5:]
    if pattern.startswith("type:"):
        return module is not None and any(c.__name__ == pattern[5:] for c in type(module).__mro__)
    if pattern.startswith("re:"):
        return re.fullmatch(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


@dataclass(frozen=True)
class Rule:
    """One line of a plan.

    Attributes:
        pattern: glob (or ``re:`` regex) over module names.
        weight: the weight format, or None to keep matching modules in float.
        method: the algorithm config that chooses the quantized values (default: round-to-nearest).
        act: activation quantization of the module's input, or None for float activations.
        bias_correction: after quantizing, shift the bias so each output channel keeps its mean:
            ``True`` measures the input mean on calibration data (``lowbit.algorithms.bias_correction``);
            ``"analytic"`` derives it, with no data, from the BatchNorm before the layer (DFQ; see
            ``lowbit.transforms.equalization.expected_input_means``).
    """

    pattern: str
    weight: QuantSpec | None
    method: Any = field(default_factory=RTN)
    act: ActivationQuant | None = None
    bias_correction: bool | str = False

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, str) or not self.pattern:
            raise InputError(f"a rule needs a non-empty module-name pattern, got {self.pattern!r}")
        _check_role(self.pattern, f"rule {self.pattern!r}")
        if self.pattern.startswith("re:"):
            try:
                re.compile(self.pattern[3:])
            except re.error as e:
                raise InputError(f"rule pattern {self.pattern!r} is not a valid regular expression: {e}") from None
        if isinstance(self.weight, str):
            object.__setattr__(self, "weight", parse_spec(self.weight))
        if isinstance(self.method, (str, dict)):
            object.__setattr__(self, "method", make_algorithm(self.method))
        if not isinstance(self.method, Algorithm):
            raise InputError(f"rule {self.pattern!r}: method must be an algorithm name, a dict with 'name', or an "
                             f"object with name, stats_needed, run() and to_dict(); got {self.method!r}")
        if isinstance(self.act, (str, dict)):
            object.__setattr__(self, "act", ActivationQuant.from_dict(self.act))
        if not isinstance(self.bias_correction, bool) and self.bias_correction != "analytic":
            raise InputError(f"rule {self.pattern!r}: bias_correction must be true (measured on calibration data), "
                             f"'analytic' (from the BatchNorm before each layer, no data) or false; got "
                             f"{self.bias_correction!r}")

    def matches(self, name: str, roles: dict[str, str] | None = None) -> bool:
        return _match(self.pattern, name, roles=roles)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"pattern": self.pattern, "weight": None if self.weight is None else self.weight.name}
        d["method"] = self.method.to_dict()
        if self.act is not None:
            d["act"] = self.act.to_dict()
        if self.bias_correction:
            d["bias_correction"] = self.bias_correction
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "rule") -> "Rule":
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected a mapping with pattern/weight/method/act, got {d!r}")
        unknown = set(d) - {"pattern", "weight", "method", "act", "bias_correction"}
        if unknown:
            raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; known: pattern, weight, method, act, "
                             "bias_correction")
        if "pattern" not in d or "weight" not in d:
            raise InputError(f"{where}: needs 'pattern' and 'weight' (use weight: null to keep modules in float)")
        try:
            w = d["weight"]
            weight = None if w is None else (QuantSpec.from_dict(w) if isinstance(w, dict) else parse_spec(str(w)))
            return cls(d["pattern"], weight, d.get("method", "rtn"), d.get("act"), d.get("bias_correction", False))
        except InputError as e:
            raise InputError(f"{where}: {e}") from None


@dataclass(frozen=True)
class QuantPlan:
    """Ordered rules plus skip patterns, the float transforms applied before any rule (names in
    ``lowbit.transforms.TRANSFORMS``, in order) and the KV-cache quantization (or None); see the module
    docstring."""

    rules: tuple[Rule, ...]
    skip: tuple[str, ...] = DEFAULT_SKIP
    transforms: tuple[str, ...] = ()
    kv: KVCacheQuant | None = None
    reconstruct: Reconstruction | None = None
    inputs: tuple[InputQuant, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rules", tuple(self.rules))
        object.__setattr__(self, "skip", tuple(self.skip))
        for p in self.skip:
            _check_role(p, "skip pattern")
        object.__setattr__(self, "transforms", check_transforms(self.transforms))
        if isinstance(self.kv, (str, dict)):
            object.__setattr__(self, "kv", KVCacheQuant.from_dict(self.kv))
        if self.kv is not None and not isinstance(self.kv, KVCacheQuant):
            raise InputError(f"plan kv must be a KVCacheQuant, a scheme name or a mapping, got {self.kv!r}")
        if not self.rules:
            raise InputError("a plan needs at least one rule")
        if isinstance(self.reconstruct, (bool, dict)):
            object.__setattr__(self, "reconstruct", Reconstruction.from_dict(self.reconstruct) if self.reconstruct
                               else None)
        inputs = tuple(InputQuant.from_dict(e, f"plan inputs[{i}]") if isinstance(e, dict) else e
                       for i, e in enumerate(self.inputs))
        if not all(isinstance(e, InputQuant) for e in inputs):
            raise InputError(f"plan inputs must be InputQuant entries or mappings, got {self.inputs!r}")
        object.__setattr__(self, "inputs", inputs)
        if self.reconstruct is not None and not isinstance(self.reconstruct, Reconstruction):
            raise InputError(f"plan reconstruct must be a Reconstruction, true or a mapping, got {self.reconstruct!r}")

    @classmethod
    def uniform(
        cls,
        weight: QuantSpec | str,
        method: Any = "rtn",
        act: ActivationQuant | str | dict | None = None,
        skip: tuple[str, ...] = DEFAULT_SKIP,
        bias_correction: bool = False,
    ) -> "QuantPlan":
        """One format and algorithm for every quantizable module except ``skip``."""
        return cls((Rule("*", weight, method, act, bias_correction),), tuple(skip))

    @property
    def needs_data(self) -> bool:
        """True when ``quantize`` needs calibration data for this plan."""
        if any(t in NEEDS_DATA for t in self.transforms) or self.reconstruct is not None \
                or any(not e.act.dynamic for e in self.inputs):
            return True
        return any(
            (r.act is not None and not r.act.dynamic) or r.bias_correction is True or bool(r.method.stats_needed)
            for r in self.rules if r.weight is not None
        )

    def rule_for(self, name: str, module: Any = None, roles: dict[str, str] | None = None) -> Rule | None:
        """The rule that applies to module ``name`` (``module`` is needed for ``type:`` skip patterns, the model's
        ``lowbit.nn.roles.module_roles`` for ``role:`` ones), or None if it stays float."""
        if any(_match(p, name, module, roles) for p in self.skip):
            return None
        for r in self.rules:
            if r.matches(name, roles):
                return None if r.weight is None else r
        return None

    # ---- dict / YAML ---------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"skip": list(self.skip), "rules": [r.to_dict() for r in self.rules]}
        if self.transforms:  # only when set: plans without transforms keep their old dicts (and run keys)
            d["transforms"] = list(self.transforms)
        if self.kv is not None:
            d["kv"] = self.kv.to_dict()
        if self.reconstruct is not None:
            d["reconstruct"] = self.reconstruct.to_dict()
        if self.inputs:
            d["inputs"] = [e.to_dict() for e in self.inputs]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = "recipe") -> "QuantPlan":
        if d is None:
            raise InputError(f"{where} is empty; it needs 'rules' (see lowbit.plan for an example)")
        if not isinstance(d, dict):
            raise InputError(f"{where}: expected a mapping with 'rules' (and optional 'skip'), got {type(d).__name__}")
        unknown = set(d) - {"rules", "skip", "transforms", "kv", "reconstruct", "inputs", "name", "description"}
        if unknown:
            raise InputError(f"{where}: unknown key(s) {sorted(unknown)}; known: rules, skip, transforms, kv, "
                             f"reconstruct, inputs, name, description")
        rules = d.get("rules")
        if not isinstance(rules, list) or not rules:
            raise InputError(f"{where}: 'rules' must be a non-empty list of rules")
        skip = d.get("skip", list(DEFAULT_SKIP))
        if skip is None:
            skip = []
        if not isinstance(skip, list) or not all(isinstance(s, str) for s in skip):
            raise InputError(f"{where}: 'skip' must be a list of module-name patterns")
        transforms = d.get("transforms") or []
        if not isinstance(transforms, list) or not all(isinstance(t, str) for t in transforms):
            raise InputError(f"{where}: 'transforms' must be a list of transform names, e.g. [fuse_norms]")
        try:
            kv = None if d.get("kv") is None else KVCacheQuant.from_dict(d["kv"])
        except InputError as e:
            raise InputError(f"{where}: kv: {e}") from None
        reconstruct = None
        if d.get("reconstruct") not in (None, False):
            reconstruct = Reconstruction.from_dict(d["reconstruct"], f"{where}: reconstruct")
        inputs = d.get("inputs") or []
        if not isinstance(inputs, list):
            raise InputError(f"{where}: 'inputs' must be a list of {{pattern, act}} mappings")
        inputs = tuple(InputQuant.from_dict(e, f"{where}: inputs[{i}]") for i, e in enumerate(inputs))
        return cls(tuple(Rule.from_dict(r, f"{where}: rules[{i}]") for i, r in enumerate(rules)), tuple(skip),
                   check_transforms(transforms, where), kv, reconstruct, inputs)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, text: str, where: str = "recipe") -> "QuantPlan":
        if len(text) > MAX_RECIPE_BYTES:
            raise InputError(f"{where} is {len(text)} characters, more than a recipe can be ({MAX_RECIPE_BYTES}); "
                             f"a recipe is a short list of rules")
        try:
            d = yaml.safe_load(text)
            return cls.from_dict(d, where)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            raise InputError(f"{where} is not valid YAML{at}: {getattr(e, 'problem', None) or e}") from None
        except RecursionError:  # PyYAML composes nested lists and mappings recursively
            raise InputError(f"{where} is nested too deeply to be a recipe (a recipe is a mapping of rules, a few "
                             f"levels deep)") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "QuantPlan":
        """Read a YAML recipe file (UTF-8, at most ``MAX_RECIPE_BYTES``)."""
        p = Path(path)
        return cls.from_yaml(_read_recipe(p), where=f"recipe {p}")

    def save(self, path: str | os.PathLike) -> None:
        """Write the plan as a YAML recipe, atomically (an existing regular file is replaced)."""
        from lowbit.atomic import atomic_file  # lazy: lowbit.io imports this module
        from lowbit.io.save import check_destination

        with atomic_file(check_destination(path, True, file=True)) as tmp:
            tmp.write_text(self.to_yaml(), encoding="utf-8")


def _read_recipe(p: Path) -> str:
    """The text of recipe file ``p``; InputError naming ``p`` for a missing path, a folder, a device or fifo
    (never opened: a fifo would block, /dev/zero never ends), a file too large, or bytes that are not UTF-8."""
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise InputError(f"recipe file {p} does not exist") from None
    except OSError as e:
        raise InputError(f"recipe file {p} cannot be read: {e.strerror or e}") from None
    if stat.S_ISDIR(mode):
        raise InputError(f"recipe {p} is a folder; pass the YAML recipe file inside it")
    if not stat.S_ISREG(mode):
        raise InputError(f"recipe {p} is not a regular file (a device, fifo or socket); pass a YAML recipe file")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)  # capped: the file may grow, or be a link to something endless
    except OSError as e:
        raise InputError(f"recipe file {p} cannot be read: {e.strerror or e}") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise InputError(f"recipe {p} is larger than {MAX_RECIPE_BYTES} bytes; a recipe is a short list of "
                         f"rules: is it the right file?")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(f"recipe {p} is not UTF-8 text (byte 0x{data[e.start]:02x} at offset {e.start}); "
                         f"save it as UTF-8") from None

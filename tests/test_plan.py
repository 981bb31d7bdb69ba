"""QuantPlan: rule order, skip and regex patterns, uniform plans, YAML recipes and their error messages."""

from __future__ import annotations

import json

import pytest
import torch

from lowbit.algorithms import RTN
from lowbit.errors import InputError
from lowbit.plan import DEFAULT_SKIP, QuantPlan, Rule
from lowbit.spec import ActivationQuant, QuantSpec

INT8, INT4 = QuantSpec.parse("int8"), QuantSpec.parse("int4-g128-asym")


def _weight(plan: QuantPlan, name: str) -> str | None:
    r = plan.rule_for(name)
    return None if r is None else r.weight.name


def test_first_matching_rule_wins():
    plan = QuantPlan((Rule("*.down_proj", "int8"), Rule("*.mlp.*", "int6"), Rule("*", "int4-g128-asym")))
    assert _weight(plan, "model.layers.0.mlp.down_proj") == "int8"
    assert _weight(plan, "model.layers.0.mlp.up_proj") == "int6"
    assert _weight(plan, "model.layers.0.self_attn.q_proj") == "int4-g128-asym"
    # the same rules in the other order: the catch-all shadows everything after it
    rev = QuantPlan(tuple(reversed(plan.rules)))
    assert _weight(rev, "model.layers.0.mlp.down_proj") == "int4-g128-asym"


def test_weight_none_keeps_float_and_stops_the_search():
    plan = QuantPlan((Rule("*.fc1", None), Rule("*", "int8")))
    assert plan.rule_for("block.fc1") is None
    assert _weight(plan, "block.fc2") == "int8"


def test_skip_patterns_come_before_rules():
    plan = QuantPlan((Rule("lm_head", "int8"), Rule("*", "int4-g128-asym")))
    assert plan.skip == DEFAULT_SKIP
    assert plan.rule_for("lm_head") is None  # skipped even though a rule names it
    emb, lin = torch.nn.Embedding(4, 2), torch.nn.Linear(2, 2)
    # embeddings are skipped by class, whatever their name; a linear named like one is not
    assert plan.rule_for("model.embed_tokens", emb) is None and plan.rule_for("transformer.wte", emb) is None
    assert _weight(plan, "transformer.wte") == "int4-g128-asym"  # no module given: type: patterns cannot match
    assert plan.rule_for("model.embed_proj", lin) is not None
    assert _weight(plan, "model.layers.1.mlp.down_proj") == "int4-g128-asym"
    no_skip = QuantPlan(plan.rules, skip=())
    assert _weight(no_skip, "lm_head") == "int8" and _weight(no_skip, "model.embed_tokens") == "int4-g128-asym"


def test_globs_cross_dots_and_match_whole_names():
    r = Rule("*.mlp.*", "int8")
    assert r.matches("model.layers.0.mlp.up_proj") and r.matches("x.mlp.y.z")
    assert not r.matches("mlp.up_proj") and not r.matches("model.layers.0.mlpx.up")
    assert Rule("fc?", "int8").matches("fc1") and not Rule("fc?", "int8").matches("fc10")
    assert Rule("fc[12]", "int8").matches("fc2") and not Rule("fc[12]", "int8").matches("fc3")
    assert not Rule("fc1", "int8").matches("block.fc1"), "no implicit prefix match"


def test_regex_patterns_full_match():
    r = Rule(r"re:layers\.[01]\.(q|k)_proj", "int8")
    assert r.matches("layers.0.q_proj") and r.matches("layers.1.k_proj")
    assert not r.matches("layers.2.q_proj")
    assert not r.matches("model.layers.0.q_proj"), "re: patterns must match the whole name"
    assert not r.matches("layers.0.q_proj_b")
    plan = QuantPlan((r, Rule("*", "int4-g128-asym")), skip=(r"re:.*\.v_proj",))
    assert _weight(plan, "layers.0.q_proj") == "int8"
    assert plan.rule_for("layers.0.v_proj") is None


def test_bad_regex_and_empty_pattern():
    with pytest.raises(InputError, match=r"re:layers\[.*regular expression"):
        Rule("re:layers[", "int8")
    with pytest.raises(InputError, match="non-empty"):
        Rule("", "int8")
    with pytest.raises(InputError, match="at least one rule"):
        QuantPlan(())


def test_rule_coerces_strings_and_dicts():
    r = Rule("*", "int8", {"name": "rtn", "clip_search": True}, "int8-token")
    assert r.weight == INT8 and r.method == RTN(clip_search=True)
    assert r.act == ActivationQuant(QuantSpec.parse("int8-token"))
    assert Rule("*", INT8).method == RTN()


def test_uniform_plan():
    plan = QuantPlan.uniform("int4-g128-asym")
    assert len(plan.rules) == 1 and plan.rules[0].pattern == "*" and plan.rules[0].weight == INT4
    assert plan.rules[0].method == RTN() and plan.rules[0].act is None and plan.skip == DEFAULT_SKIP
    assert QuantPlan.uniform(INT4) == plan
    p2 = QuantPlan.uniform("int8", act={"spec": "int8-tensor", "dynamic": False}, skip=())
    assert p2.rules[0].act == ActivationQuant("int8-tensor", dynamic=False) and p2.skip == ()
    assert _weight(p2, "lm_head") == "int8"


def _rich_plan() -> QuantPlan:
    return QuantPlan(
        (
            Rule("*.down_proj", "int8", act=ActivationQuant("int8-tensor", False, "percentile")),
            Rule(r"re:.*\.(q|k)_proj", "nvfp4", {"name": "rtn", "clip_search": True, "grid": 10}),
            Rule("*.o_proj", None),
            Rule("*", QuantSpec("int", 3, False, "block", block_shape=(4, 16), scale_format="bf16"),
                 act="int8-token"),
        ),
        skip=("lm_head", "*norm*"),
    )


def test_yaml_round_trip():
    plan = _rich_plan()
    text = plan.to_yaml()
    assert QuantPlan.from_yaml(text) == plan
    assert "rules[" not in text and "pattern: '*.down_proj'" in text
    assert QuantPlan.from_dict(json.loads(json.dumps(plan.to_dict()))) == plan
    uniform = QuantPlan.uniform("mxfp4")
    assert QuantPlan.from_yaml(uniform.to_yaml()) == uniform


def test_save_and_load_a_recipe_file(tmp_path):
    plan = _rich_plan()
    path = tmp_path / "recipe.yaml"
    plan.save(path)
    assert QuantPlan.load(path) == plan
    assert QuantPlan.load(str(path)) == plan


def test_hand_written_recipe(tmp_path):
    path = tmp_path / "w4.yaml"
    path.write_text(
        "name: w4\n"
        "description: int8 down projections, int4 elsewhere\n"
        "skip: [lm_head]\n"
        "rules:\n"
        "  - pattern: '*.down_proj'\n"
        "    weight: int8\n"
        "  - pattern: '*'\n"
        "    weight: {format: int, bits: 4, symmetric: false, granularity: group, group_size: 64}\n"
        "    method: {name: rtn, clip_search: true}\n"
        "    act: {spec: int8-token, dynamic: true}\n",
        encoding="utf-8",
    )
    plan = QuantPlan.load(path)
    assert plan.skip == ("lm_head",)
    assert _weight(plan, "a.down_proj") == "int8" and _weight(plan, "a.up_proj") == "int4-g64-asym"
    assert plan.rules[1].method == RTN(clip_search=True) and plan.rules[1].act.dynamic
    assert QuantPlan.from_yaml("rules: [{pattern: '*', weight: int8}]").skip == DEFAULT_SKIP
    assert QuantPlan.from_yaml("skip: null\nrules: [{pattern: '*', weight: int8}]").skip == ()


@pytest.mark.parametrize(
    "text, words",
    [
        ("- pattern: '*'\n  weight: int8\n", ["recipe", "mapping", "list"]),
        ("int8\n", ["recipe", "mapping"]),
        ("", ["recipe", "empty", "rules"]),
        ("skip: [lm_head]\n", ["'rules'", "non-empty list"]),
        ("rules: []\n", ["'rules'"]),
        ("rules: {pattern: '*', weight: int8}\n", ["'rules'", "list"]),
        ("rules: [{pattern: '*', weight: int8}]\nskp: [x]\n", ["unknown key", "skp", "rules, skip"]),
        ("rules: [{pattern: '*', weight: int8}]\nskip: lm_head\n", ["'skip'", "list"]),
        ("rules: [int8]\n", ["rules[0]", "mapping"]),
        ("rules: [{pattern: '*', weight: int8, wieght: int4}]\n", ["rules[0]", "wieght"]),
        ("rules: [{pattern: '*'}]\n", ["rules[0]", "'weight'", "null"]),
        ("rules: [{weight: int8}]\n", ["rules[0]", "'pattern'"]),
        ("rules:\n  - {pattern: '*.fc1', weight: int8}\n  - {pattern: '*', weight: int9}\n",
         ["rules[1]", "int9", "int2..int8"]),
        ("rules: [{pattern: '*.a', weight: int8}, {pattern: 're:(', weight: int8}]\n",
         ["rules[1]", "re:(", "regular expression"]),
        ("rules: [{pattern: '*', weight: int8, method: gptqq}]\n", ["rules[0]", "gptqq", "rtn"]),
        ("rules: [{pattern: '*', weight: int8, method: {name: rtn, clip: true}}]\n", ["rules[0]", "clip"]),
        ("rules: [{pattern: '*', weight: int8, act: {spec: int8-token, dynamic: false}}]\n",
         ["rules[0]", "per-tensor"]),
        ("rules: [{pattern: '*', weight: {format: int, bits: 12}}]\n", ["rules[0]", "2..8"]),
        ("rules: [{pattern: '*', weight: int8}\n", ["not valid YAML"]),
    ],
)
def test_malformed_recipes_name_the_place(text, words):
    with pytest.raises(InputError) as e:
        QuantPlan.from_yaml(text)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_errors_in_a_file_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("rules:\n  - {pattern: '*', weight: int8}\n  - {pattern: x, weight: int4-gx}\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"bad\.yaml: rules\[1\].*int4-gx"):
        QuantPlan.load(path)
    with pytest.raises(InputError, match=r"missing\.yaml does not exist"):
        QuantPlan.load(tmp_path / "missing.yaml")
    with pytest.raises(InputError, match="is a folder"):
        QuantPlan.load(tmp_path)  # a directory is not a recipe


def test_bundled_recipes_parse_and_round_trip():
    from pathlib import Path

    recipes = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))
    assert recipes, "the repository ships example recipes"
    for path in recipes:
        plan = QuantPlan.load(path)
        assert QuantPlan.from_yaml(plan.to_yaml()) == plan


def test_recipes_are_the_plans_their_measurements_used(monkeypatch):
    """The README's numbers for these recipes come from the benchmarks' own plans: keep them the same."""
    import importlib.util
    from pathlib import Path

    from lowbit.bench import vision_plan

    root = Path(__file__).resolve().parents[1]
    assert QuantPlan.load(root / "recipes/cnn-w8a8-static.yaml") == vision_plan()
    monkeypatch.syspath_prepend(str(root / "benchmarks"))  # as when the script runs: its folder is on the path
    spec = importlib.util.spec_from_file_location("llm_quality", root / "benchmarks/llm_quality.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    for recipe, scheme, method in (("w3-gptq-sequential.yaml", "int3-g64-asym", "gptq-seq"),
                                   ("w4-awq-gptq.yaml", "int4-g128-asym", "awq+gptq-seq")):
        assert QuantPlan.load(root / "recipes" / recipe) == QuantPlan.uniform(scheme, bench.METHODS[method]), recipe


def test_activation_recipes_are_the_plans_their_benchmark_rows_use(monkeypatch):
    import importlib.util
    from pathlib import Path

    from lowbit.models import tiny

    root = Path(__file__).resolve().parents[1]
    monkeypatch.syspath_prepend(str(root / "benchmarks"))
    spec = importlib.util.spec_from_file_location("llm_activations", root / "benchmarks/llm_activations.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    llama = tiny.tiny_llama()  # the Llama family: 'rot' is the rotate transform
    for recipe, row, kv in (("w8a8-smoothquant.yaml", "w8a8-sq", None),
                            ("w4a4kv4-rotation-gptq.yaml", "w4a4-rot-gptq", {"spec": "int4-token-asym", "rotate": True}),
                            ("w3-rotation-gptq.yaml", "w3-rot-gptq", None)):
        plan = bench.plan_for(bench.ROWS[row][1], llama)
        if kv is not None:  # the KV4 twin of the row: the same quantization, its cache quantized at run time
            plan = QuantPlan(plan.rules, plan.skip, plan.transforms, kv)
        assert QuantPlan.load(root / "recipes" / recipe) == plan, recipe

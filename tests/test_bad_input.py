"""Bad input, through the command line and the Python API.

The contract (README, "Command line"): bad input stops with a message that names what and where, exit code 2
(``lowbit CMD: error: ...`` on stderr, no traceback), nothing written at ``--out`` and no temporary folder left
next to it. From Python the same cases raise :class:`lowbit.InputError` (a ``ValueError``), or its subclass
:class:`lowbit.CorruptFileError` for a damaged artifact.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

import lowbit
from lowbit import CorruptFileError, InputError, QuantPlan
from lowbit.cli import main
from lowbit.io import MANIFEST, WEIGHTS
from lowbit.models import tiny_cnn, tiny_gpt2, tiny_llama
from lowbit.nn.base import QuantModule


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def assert_clean_error(rc: int, err: str, command: str, *fragments: str) -> None:
    """Exit code 2, a final ``lowbit CMD: error: ...`` message holding every fragment, and no traceback.

    (The message ends stderr; transformers' own "Loading weights" progress bar may come before it.)
    """
    assert rc == 2, err
    assert "Traceback" not in err
    head = f"lowbit {command}: error: "
    start = err.rfind(head)
    assert start == 0 or (start > 0 and err[start - 1] == "\n"), err
    message = err[start:]
    for f in fragments:
        assert f in message, f"{f!r} not in {message!r}"


@pytest.fixture
def outdir(tmp_path: Path):
    """An --out path inside an empty folder; after the test that folder must still be empty."""
    parent = tmp_path / "outputs"
    parent.mkdir()
    yield parent / "art"
    assert sorted(p.name for p in parent.iterdir()) == [], "something was written next to --out"


def quantize_cli(capsys, model: object, outdir: Path, *extra: object) -> tuple[int, str, str]:
    return run(capsys, "quantize", model, *extra, "--out", outdir)


def is_float(model: torch.nn.Module) -> bool:
    return not any(isinstance(m, QuantModule) for m in model.modules())


# ---- the model -----------------------------------------------------------------------------------------------


def test_missing_model_path(capsys, tmp_path, outdir):
    missing = tmp_path / "no" / "such-model"
    rc, _, err = quantize_cli(capsys, missing, outdir, "--scheme", "int8")
    assert_clean_error(rc, err, "quantize", str(missing), "neither a bundled model", "tiny-llama")
    with pytest.raises(InputError, match="no/such-model"):
        lowbit.load_model(missing)


def test_misspelled_bundled_name(capsys, outdir):
    rc, _, err = quantize_cli(capsys, "smollm2-136m", outdir, "--scheme", "int8")
    assert_clean_error(rc, err, "quantize", "'smollm2-136m'", "smollm2-135m")


def test_a_folder_that_is_not_a_model(capsys, tmp_path, outdir):
    folder = tmp_path / "holiday-photos"
    folder.mkdir()
    (folder / "notes.txt").write_text("not a model")
    rc, _, err = quantize_cli(capsys, folder, outdir, "--scheme", "int8")
    assert_clean_error(rc, err, "quantize", str(folder), "config.json")
    with pytest.raises(InputError, match="config.json"):
        lowbit.load_model(folder)


def test_a_file_that_is_not_a_model(capsys, tmp_path, outdir):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"\0" * 64)
    rc, _, err = quantize_cli(capsys, f, outdir, "--scheme", "int8")
    assert_clean_error(rc, err, "quantize", str(f), ".gguf")


def test_a_corrupt_gguf_file(capsys, tmp_path, outdir):
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\xff" * 60)
    rc, _, err = quantize_cli(capsys, f, outdir, "--scheme", "int8")
    assert_clean_error(rc, err, "quantize", str(f))


# ---- schemes and methods ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["int9", "foo"])
def test_unknown_scheme(capsys, outdir, scheme):
    rc, _, err = quantize_cli(capsys, "tiny-llama", outdir, "--scheme", scheme)
    assert_clean_error(rc, err, "quantize", f"unknown quantization scheme {scheme!r}", "int4-g128-asym")
    with pytest.raises(InputError, match=scheme):
        QuantPlan.uniform(scheme)
    with pytest.raises(InputError, match=scheme):
        lowbit.QuantSpec.parse(scheme)


@pytest.mark.parametrize("method", ["gptq-typo", "foo"])
def test_unknown_method(capsys, outdir, method):
    rc, _, err = quantize_cli(capsys, "tiny-llama", outdir, "--scheme", "int8", "--method", method)
    assert_clean_error(rc, err, "quantize", f"unknown algorithm {method!r}", "rtn")
    with pytest.raises(InputError, match="unknown algorithm"):
        QuantPlan.uniform("int8", method=method)


def test_unknown_activation_scheme(capsys, outdir):
    rc, _, err = quantize_cli(capsys, "tiny-llama", outdir, "--scheme", "int8", "--act", "int7-tokn")
    assert_clean_error(rc, err, "quantize", "int7-tokn")


# ---- a spec that does not fit a layer --------------------------------------------------------------------------


def test_group_larger_than_a_layer_names_the_module(capsys, outdir):
    rc, _, err = quantize_cli(capsys, "tiny-gpt2", outdir, "--scheme", "int4-g128-asym")
    assert_clean_error(rc, err, "quantize", "module 'transformer.h.0.attn.c_attn'", "group size 128",
                       "64 input elements", "group size <= 64")


def test_group_larger_than_a_conv_kernel_names_the_module(capsys, outdir):
    rc, _, err = quantize_cli(capsys, "tiny-cnn", outdir, "--scheme", "int4-g64")
    assert_clean_error(rc, err, "quantize", "module 'features.0'", "27 input elements", "(16, 3, 3, 3)")


def test_spec_that_does_not_fit_leaves_the_model_unchanged():
    model = tiny_llama()
    with pytest.raises(InputError, match=r"module 'model\.layers\.0\.self_attn\.q_proj'.*group size 128"):
        lowbit.quantize(model, "int4-g128-asym", progress=False)
    assert is_float(model)


# ---- NaN / Inf weights -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weight_in_a_saved_folder_names_the_module(capsys, tmp_path, outdir, value):
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[3, 5] = value
    folder = tmp_path / "bad-llama"
    model.save_pretrained(folder)
    rc, _, err = quantize_cli(capsys, folder, outdir, "--scheme", "int8")
    assert_clean_error(rc, err, "quantize", "module 'model.layers.1.mlp.up_proj'", "NaN/Inf", "(128, 64)")


def test_non_finite_weight_through_the_api_leaves_the_model_unchanged():
    model = tiny_gpt2()
    with torch.no_grad():
        model.transformer.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match=r"module 'transformer\.h\.0\.mlp\.c_fc'.*NaN"):
        lowbit.quantize(model, "int8", progress=False)
    assert is_float(model)


# ---- calibration data --------------------------------------------------------------------------------------------


STATIC_ACT = {"spec": "int8-tensor", "dynamic": False, "observer": "minmax"}


@pytest.mark.parametrize("empty", [[], (), torch.empty(0, 32, dtype=torch.long)], ids=["list", "tuple", "tensor"])
def test_empty_calibration_set(empty):
    model = tiny_llama()
    plan = QuantPlan.uniform("int8", act=STATIC_ACT)
    assert plan.needs_data
    with pytest.raises(InputError, match="calibration data set is empty"):
        lowbit.quantize(model, plan, data=empty, progress=False)
    assert is_float(model)


def test_empty_calibration_set_for_bias_correction():
    model = tiny_cnn()
    with pytest.raises(InputError, match="calibration data set is empty"):
        lowbit.quantize(model, QuantPlan.uniform("int8", bias_correction=True), data=[], progress=False)
    assert is_float(model)


def test_missing_calibration_data_names_the_modules():
    with pytest.raises(InputError, match=r"needs calibration data .*model\.layers\.0\.self_attn\.q_proj"):
        lowbit.quantize(tiny_llama(), QuantPlan.uniform("int8", act=STATIC_ACT), progress=False)


@pytest.mark.parametrize("n", ["0", "-3", "many"])
def test_calibration_sample_count_must_be_positive(capsys, outdir, n):
    # argparse's own usage error (exit code 2); 0 used to mean "the default, 64" silently
    rc, _, err = run(capsys, "quantize", "tiny-cnn", "--scheme", "int8", "--bias-correction", "--calib-samples", n,
                     "--out", outdir)
    assert rc == 2
    assert "--calib-samples" in err and "positive integer" in err


# ---- recipes -----------------------------------------------------------------------------------------------------


RECIPES = {
    "invalid-yaml": ("rules: [\n  - pattern: '*'\n", ["is not valid YAML", "line 2"]),
    "not-a-mapping": ("- pattern: '*'\n  weight: int8\n", ["expected a mapping with 'rules'", "got list"]),
    "unknown-key": ("rules:\n  - {pattern: '*', weight: int8}\nrulez: []\n", ["unknown key(s) ['rulez']"]),
    "unknown-rule-key": ("rules:\n  - {pattern: '*', wieght: int8}\n", ["rules[0]", "unknown key(s) ['wieght']"]),
    "bad-scheme-in-rule-2": ("rules:\n  - {pattern: '*.mlp.*', weight: int8}\n  - {pattern: '*', weight: int9}\n",
                             ["rules[1]", "unknown quantization scheme 'int9'"]),
    "bad-method-in-rule-2": ("rules:\n  - {pattern: '*.mlp.*', weight: int8}\n"
                             "  - {pattern: '*', weight: int8, method: {name: rtn, clip_serch: true}}\n",
                             ["rules[1]", "clip_serch"]),
    "no-rules": ("skip: [lm_head]\n", ["'rules' must be a non-empty list"]),
}


@pytest.mark.parametrize("case", RECIPES)
def test_malformed_recipe(capsys, tmp_path, outdir, case):
    text, fragments = RECIPES[case]
    recipe = tmp_path / f"{case}.yaml"
    recipe.write_text(text)
    rc, _, err = quantize_cli(capsys, "tiny-llama", outdir, "--recipe", recipe)
    assert_clean_error(rc, err, "quantize", str(recipe), *fragments)
    with pytest.raises(InputError) as e:
        QuantPlan.load(recipe)
    assert str(recipe) in str(e.value) and all(f in str(e.value) for f in fragments)


def test_missing_recipe_file(capsys, tmp_path, outdir):
    recipe = tmp_path / "w4-mixed.yaml"
    rc, _, err = quantize_cli(capsys, "tiny-llama", outdir, "--recipe", recipe)
    assert_clean_error(rc, err, "quantize", f"recipe file {recipe} does not exist")
    with pytest.raises(InputError, match="does not exist"):
        QuantPlan.load(recipe)


def test_recipe_that_selects_nothing(capsys, tmp_path, outdir):
    recipe = tmp_path / "all-float.yaml"
    recipe.write_text("rules:\n  - {pattern: '*', weight: null}\n")
    rc, _, err = quantize_cli(capsys, "tiny-llama", outdir, "--recipe", recipe)
    assert_clean_error(rc, err, "quantize", "selects no module")


# ---- --out -------------------------------------------------------------------------------------------------------


def test_out_is_an_existing_file(capsys, tmp_path):
    f = tmp_path / "model.bin"
    f.write_bytes(b"precious")
    rc, _, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--out", f, "--overwrite")
    assert_clean_error(rc, err, "quantize", str(f), "is a file")
    assert f.read_bytes() == b"precious"


def test_out_is_a_folder_of_other_files_even_with_overwrite(capsys, tmp_path):
    folder = tmp_path / "thesis"
    folder.mkdir()
    (folder / "chapter1.tex").write_text("precious")
    rc, out, err = run(capsys, "quantize", "tiny-llama", "--scheme", "int8", "--out", folder, "--overwrite")
    assert_clean_error(rc, err, "quantize", str(folder), "chapter1.tex", "not a lowbit artifact")
    assert [p.name for p in folder.iterdir()] == ["chapter1.tex"]
    assert [p.name for p in tmp_path.iterdir()] == ["thesis"]


# ---- evaluating ---------------------------------------------------------------------------------------------------


def test_eval_of_a_folder_without_tokenizer(capsys, tmp_path):
    folder = tmp_path / "llama-no-tokenizer"
    tiny_llama().save_pretrained(folder)
    rc, _, err = run(capsys, "eval", folder, "--tokens", "512")  # used to die with a TypeError traceback
    assert_clean_error(rc, err, "eval", "llama-no-tokenizer", "no tokenizer")


@pytest.mark.parametrize("argv", [["--tokens", "0"], ["--window", "-1"], ["--views", "0"]])
def test_eval_counts_must_be_positive(capsys, argv):
    rc, _, err = run(capsys, "eval", "tiny-cnn", *argv)
    assert rc == 2
    assert "positive integer" in err


# ---- corrupted artifacts -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A good int8 tiny-llama artifact made with the API; tests damage copies of it."""
    lm = lowbit.load_model("tiny-llama")
    lowbit.quantize(lm.model, "int8", progress=False)
    return lowbit.save(lm.model, tmp_path_factory.mktemp("good") / "llama-w8", source=lm.source, plan="int8")


def damaged(artifact: Path, tmp_path: Path, how: str) -> Path:
    copy = tmp_path / f"llama-w8-{how}"
    shutil.copytree(artifact, copy)
    weights = copy / WEIGHTS
    data = bytearray(weights.read_bytes())
    if how == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif how == "tampered":
        data[-100] ^= 0x01  # one bit of one packed weight
        weights.write_bytes(data)
    elif how == "missing":
        weights.unlink()
    elif how == "bad-manifest":
        (copy / MANIFEST).write_text("{\"format\": ")
    return copy


@pytest.mark.parametrize("how, file, fragment", [
    ("truncated", WEIGHTS, "truncated"),
    ("tampered", WEIGHTS, "SHA-256"),
    ("missing", WEIGHTS, "missing"),
    ("bad-manifest", MANIFEST, "not valid JSON"),
])
@pytest.mark.parametrize("command", [["eval"], ["inspect"], ["inspect", "--no-reference"]])
def test_corrupted_artifact(capsys, tmp_path, artifact, how, file, fragment, command):
    path = damaged(artifact, tmp_path, how)
    rc, _, err = run(capsys, command[0], path, *command[1:])
    assert_clean_error(rc, err, command[0], str(path / file), fragment)


@pytest.mark.parametrize("how", ["truncated", "tampered", "missing", "bad-manifest"])
def test_corrupted_artifact_through_the_api(tmp_path, artifact, how):
    with pytest.raises(CorruptFileError):
        lowbit.load(damaged(artifact, tmp_path, how))


def test_not_an_artifact(capsys, tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    rc, _, err = run(capsys, "inspect", folder)
    assert_clean_error(rc, err, "inspect", str(folder), "not a lowbit artifact")
    rc, _, err = run(capsys, "inspect", tmp_path / "nowhere")
    assert_clean_error(rc, err, "inspect", str(tmp_path / "nowhere"), "no such folder")


# ---- activation settings are checked when a recipe is read -------------------------------------------------------


def test_unknown_observer_in_a_recipe_is_caught_when_the_recipe_is_read(tmp_path):
    recipe = tmp_path / "obs.yaml"
    recipe.write_text("rules:\n  - {pattern: '*', weight: int8, act: {spec: int8-tensor, dynamic: false, "
                      "observer: minmux}}\n")
    with pytest.raises(InputError, match=r"rules\[0\].*minmux"):
        QuantPlan.load(recipe)


def test_activation_dynamic_must_be_a_boolean():
    with pytest.raises(InputError, match="dynamic"):
        lowbit.ActivationQuant.from_dict({"spec": "int8-tensor", "dynamic": "no"})

"""Every transformers family lowbit is tested on: loaded as its task's class, quantized, saved with its class and
config recorded, and rebuilt by ``lowbit.load(path)`` with no ``model=`` into a model with the same outputs."""

from __future__ import annotations

import inspect
import json
import logging
import re

import pytest
import torch
from torch import nn

import lowbit
from lowbit.errors import InputError
from lowbit.models import load_model
from lowbit.models.hf import model_class
from lowbit.models.tiny import FAMILIES, example_inputs, tiny_cnn, tiny_hf
from lowbit.nn.base import QuantModule
from lowbit.nn.roles import module_roles, tied_head
from lowbit.plan import QuantPlan, Rule
from lowbit.quantizer import select_targets

KIND = {"llama": "causal-lm", "qwen3": "causal-lm", "gemma3": "causal-lm", "gpt2": "causal-lm", "opt": "causal-lm",
        "qwen3-moe": "causal-lm", "mamba": "causal-lm", "bert": "masked-lm", "t5": "seq2seq-lm",
        "bart": "seq2seq-lm", "whisper": "speech-seq2seq", "llava": "image-text-to-text", "vit": "image-classifier"}
HEAD = {"llama": "lm_head", "qwen3": "lm_head", "gemma3": "lm_head", "gpt2": "lm_head", "opt": "lm_head",
        "qwen3-moe": "lm_head", "mamba": "lm_head", "bert": "cls.predictions.decoder", "t5": "lm_head",
        "bart": "lm_head", "whisper": "proj_out", "llava": "lm_head", "vit": "classifier"}


def _logits(model: nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs)[0]


def test_every_family_is_in_the_table():
    assert set(KIND) == set(FAMILIES)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_class_and_kind_come_from_the_config(family):
    model = tiny_hf(family)
    model.config.architectures = [type(model).__name__]  # as save_pretrained writes it
    kind, cls = model_class(model.config, family)
    assert (kind, cls) == (KIND[family], type(model))


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_head_role_whatever_its_name(family):
    model = tiny_hf(family)
    roles = module_roles(model)
    assert roles.get(HEAD[family]) == ("head" if family != "vit" else None)  # a classifier is no output embedding
    plan = QuantPlan.uniform("int8")
    targets = {t.name for t in select_targets(model, plan)}
    assert HEAD[family] not in targets or family == "vit"  # the default skip keeps the head in float
    assert not any(isinstance(m, nn.Embedding) for n, m in model.named_modules() if n in targets)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_rtn_save_load_without_model(family, tmp_path):
    model = tiny_hf(family)
    inputs = example_inputs(model)
    lowbit.quantize(model, "int8", progress=False)
    assert any(isinstance(m, QuantModule) for m in model.modules())
    expected = _logits(model, inputs)
    path = lowbit.save(model, tmp_path / "a")
    source = json.loads((path / "manifest.json").read_text())["source"]
    assert source["type"] == "hf-config" and source["class"] == type(model).__name__
    loaded = lowbit.load(path)
    assert type(loaded) is type(model)
    assert torch.equal(_logits(loaded, inputs), expected)
    if tied_head(model):  # a float tied head stays tied through the round trip
        assert tied_head(loaded)


def test_tied_whisper_head_is_stored_once(tmp_path):
    model = tiny_hf("whisper")
    assert tied_head(model)
    lowbit.quantize(model, "int8", progress=False)
    path = lowbit.save(model, tmp_path / "a")
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["tied_tensors"].get("proj_out.weight") == "model.decoder.embed_tokens.weight"


def test_a_head_rule_by_role(tmp_path):
    model = tiny_hf("bert")
    plan = QuantPlan((Rule("role:head", "int8"), Rule("*", "int4-g32-asym")), skip=("type:Embedding",))
    targets = {t.name: t.rule.weight.name for t in select_targets(model, plan)}
    assert targets["cls.predictions.decoder"] == "int8"
    assert targets["bert.encoder.layer.0.attention.self.query"] == "int4-g32-asym"


def test_unknown_role_is_refused():
    with pytest.raises(InputError, match="unknown role 'lm_head'.*head, embedding"):
        QuantPlan.uniform("int8", skip=("role:lm_head",))
    with pytest.raises(InputError, match="unknown role"):
        Rule("role:output", "int8")


def test_a_plain_module_records_no_source(tmp_path):
    model = tiny_cnn()
    lowbit.quantize(model, "int8", progress=False)
    path = lowbit.save(model, tmp_path / "a")
    assert json.loads((path / "manifest.json").read_text())["source"] is None
    with pytest.raises(InputError, match="model="):
        lowbit.load(path)
    assert isinstance(lowbit.load(path, model=tiny_cnn()), nn.Module)


def test_folder_loads_as_its_task_class(tmp_path):
    model = tiny_hf("whisper")
    model.save_pretrained(tmp_path / "w", safe_serialization=True)
    lm = load_model(tmp_path / "w")
    assert lm.kind == "speech-seq2seq" and type(lm.model).__name__ == "WhisperForConditionalGeneration"
    inputs = example_inputs(model)
    assert torch.allclose(_logits(lm.model, inputs), _logits(model, inputs), atol=1e-5)


def test_remote_code_class_is_refused_with_advice(tmp_path):
    config = tiny_hf("llama").config
    config.architectures = ["MyOwnForCausalLM"]
    config.auto_map = {"AutoModelForCausalLM": "modeling_mine.MyOwnForCausalLM"}
    with pytest.raises(InputError, match=r"MyOwnForCausalLM.*own code.*trust_remote_code=True.*model="):
        model_class(config, "folder")
    config.auto_map = None
    with pytest.raises(InputError, match=r"MyOwnForCausalLM.*no model class lowbit can build"):
        model_class(config, "folder")


def test_config_without_architectures_takes_the_first_task():
    config = tiny_hf("llama").config
    config.architectures = None
    kind, cls = model_class(config, "x")
    assert kind == "causal-lm" and cls.__name__ == "AutoModelForCausalLM"


def test_hf_config_source_is_no_float_model():
    with pytest.raises(InputError, match="no weights"):
        load_model({"type": "hf-config", "class": "LlamaForCausalLM", "config": tiny_hf("llama").config.to_dict()})
    with pytest.raises(InputError, match="'class' string and a 'config'"):
        load_model({"type": "hf-config", "config": {}})


def _cli(capsys, *argv) -> tuple[int, str, str]:
    from lowbit.cli import main

    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_cli_quantizes_a_speech_folder_and_inspects_it(tmp_path, capsys):
    model = tiny_hf("whisper")
    model.save_pretrained(tmp_path / "w", safe_serialization=True)
    rc, out, _ = _cli(capsys, "quantize", tmp_path / "w", "--scheme", "int8", "--out", tmp_path / "q")
    assert rc == 0 and "quantized w" in out
    manifest = json.loads((tmp_path / "q" / "manifest.json").read_text())
    assert manifest["source"]["type"] == "hf-folder"
    assert manifest["tied_tensors"] == {"proj_out.weight": "model.decoder.embed_tokens.weight"}  # stored once
    rc, out, _ = _cli(capsys, "inspect", tmp_path / "q")
    assert rc == 0 and "model.encoder.layers.0.fc1" in out
    rc, _, err = _cli(capsys, "eval", tmp_path / "q")
    assert rc == 2 and "a speech model is evaluated on audio and lowbit bundles none: pass --data FOLDER" in err
    # a data-aware plan needs audio, which lowbit does not bundle: said before any quantization
    rc, _, err = _cli(capsys, "quantize", tmp_path / "w", "--scheme", "int4-g32-asym", "--method", "gptq",
                      "--out", tmp_path / "g")
    assert rc == 2 and "a speech model calibrates on audio and lowbit bundles none" in err
    assert not (tmp_path / "g").exists()


def test_cli_inspects_an_artifact_saved_from_python(tmp_path, capsys):
    model = tiny_hf("t5")
    lowbit.quantize(model, "int8", progress=False)
    lowbit.save(model, tmp_path / "a")
    rc, out, _ = _cli(capsys, "inspect", tmp_path / "a")
    assert rc == 0 and "no float reference" in out and "T5ForConditionalGeneration" in out
    rc, _, err = _cli(capsys, "eval", tmp_path / "a")
    assert rc == 2 and "saved from Python" in err


@pytest.mark.parametrize("method", ["gptq", "awq"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_data_aware_save_load_without_model(family, method, tmp_path):
    """Every family through a data-aware algorithm on its own kind of input (token ids, decoder ids, mel
    features, pixels); layers an algorithm cannot take fall back to round to nearest."""
    model = tiny_hf(family)
    data = [example_inputs(model, seed=s) for s in range(3)]
    plan = QuantPlan.uniform("int4-ch-asym", method=method)
    lowbit.quantize(model, plan, data, progress=False)
    if family == "mamba":  # its mixer multiplies by dt_proj.weight without calling the layer: nothing to observe
        fallback = model.lowbit_calibration["fallbacks"][f"{method} -> rtn (never called)"]
        assert fallback == [f"backbone.layers.{i}.mixer.dt_proj" for i in range(model.config.num_hidden_layers)]
        assert isinstance(model.get_submodule(fallback[0]), QuantModule)
    inputs = example_inputs(model, seed=7)
    expected = _logits(model, inputs)
    loaded = lowbit.load(lowbit.save(model, tmp_path / "a"))
    assert torch.equal(_logits(loaded, inputs), expected)


@pytest.mark.parametrize("family", ["bart", "whisper"])
def test_decoder_is_calibrated_on_the_quantized_encoder(family):
    """Stacks run in execution order, each on the model quantized so far: the cross-attention inputs the
    decoder's blocks are observed with are the quantized encoder's outputs, not the float encoder's."""
    model = tiny_hf(family)
    data = [example_inputs(model, seed=s) for s in range(2)]
    encoder = model.get_encoder()
    with torch.no_grad():
        float_out = [encoder(**_encoder_inputs(b))[0] for b in data]
    seen = []
    block = model.get_decoder().layers[0]
    signature = inspect.signature(block.forward)
    hook = block.register_forward_pre_hook(  # positional or keyword, as the model passes it
        lambda m, args, kwargs: seen.append(
            signature.bind(*args, **kwargs).arguments["encoder_hidden_states"].clone()), with_kwargs=True)
    try:
        lowbit.quantize(model, QuantPlan.uniform("int3-ch-asym", method="gptq"), data, progress=False)
    finally:
        hook.remove()
    with torch.no_grad():
        quant_out = [encoder(**_encoder_inputs(b))[0] for b in data]
    # the block's calibration is its last calls: observed, then run for the next block's inputs, per batch
    # (earlier calls: passes that order the stacks and observe the layers before them, on the float encoder)
    calibration = seen[-2 * len(data):]
    assert len(seen) >= 2 * len(data)
    for got in calibration:
        assert any(torch.equal(got, q) for q in quant_out)
        assert not any(torch.allclose(got, f, atol=1e-4) for f in float_out)


def _encoder_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if not k.startswith("decoder_")}


def test_schedule_is_the_order_a_forward_pass_runs(caplog):
    model = tiny_hf("vit")
    data = [example_inputs(model, seed=s) for s in range(2)]
    with caplog.at_level(logging.INFO, logger="lowbit.quantizer"):
        lowbit.quantize(model, QuantPlan.uniform("int4-ch-asym", method="gptq", skip=()), data, progress=False)
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith("calibration schedule")]
    assert said == ["calibration schedule: vit.embeddings.patch_embeddings.projection -> vit.layers (2 blocks) -> "
                    "classifier"]


@pytest.mark.parametrize("family", ["gpt2", "whisper"])
def test_a_tied_head_quantized_alike_is_quantized_and_stored_once(family, tmp_path):
    model = tiny_hf(family)
    inputs = example_inputs(model)
    lowbit.quantize(model, QuantPlan.uniform("int8", skip=()), progress=False)  # head and embedding too
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    assert head.qweight is emb.qweight and head.scale is emb.scale
    expected = _logits(model, inputs)
    path = lowbit.save(model, tmp_path / "a")
    tied = json.loads((path / "manifest.json").read_text())["tied_tensors"]
    head_name = HEAD[family]
    assert tied[f"{head_name}.qweight"].endswith("embed_tokens.qweight" if family == "whisper" else "wte.qweight")
    loaded = lowbit.load(path)
    assert loaded.get_output_embeddings().qweight is loaded.get_input_embeddings().qweight
    assert torch.equal(_logits(loaded, inputs), expected)


def test_a_tied_head_quantized_alone_says_the_tie_breaks(caplog):
    model = tiny_hf("whisper")
    with caplog.at_level(logging.WARNING, logger="lowbit.quantizer"):
        lowbit.quantize(model, QuantPlan.uniform("int8", skip=("type:Embedding",)), progress=False)
    said = " ".join(r.getMessage() for r in caplog.records)
    assert re.search(r"'proj_out' shares its weight \([0-9.]+ MB in float\) with the input embedding "
                     r"'model.decoder.embed_tokens'", said)
    assert "the tie breaks" in said and "role:embedding" in said


def test_the_calibration_record_is_saved_and_inspect_prints_it(tmp_path, capsys):
    model = tiny_hf("whisper")
    data = [example_inputs(model, seed=s) for s in range(2)]
    lowbit.quantize(model, QuantPlan.uniform("int4-ch-asym", method="awq"), data, progress=False)
    path = lowbit.save(model, tmp_path / "a")
    record = json.loads((path / "manifest.json").read_text())["extra"]["calibration"]
    # the front-end convolutions run first and are calibrated first (AWQ scales them per input channel)
    assert record["schedule"] == [{"layers": ["model.encoder.conv1", "model.encoder.conv2"]},
                                  {"stack": "model.encoder.layers", "blocks": 2, "tokens": 64},
                                  {"stack": "model.decoder.layers", "blocks": 2, "tokens": 32}]
    assert record["fallbacks"] == {}
    assert model.model.encoder.conv1.input_scale is not None
    rc, out, _ = _cli(capsys, "inspect", path)
    assert rc == 0
    assert ("calibration: model.encoder.conv1, model.encoder.conv2 -> model.encoder.layers (2 blocks, 64 tokens "
            "or positions) -> model.decoder.layers (2 blocks, 32 tokens or positions)") in out
    mamba = tiny_hf("mamba")
    lowbit.quantize(mamba, QuantPlan.uniform("int4-ch-asym", method="gptq"),
                    [example_inputs(mamba, seed=s) for s in range(2)], progress=False)
    rc, out, _ = _cli(capsys, "inspect", lowbit.save(mamba, tmp_path / "m"))
    assert rc == 0 and ("algorithm fallback gptq -> rtn (never called): backbone.layers.0.mixer.dt_proj, "
                        "backbone.layers.1.mixer.dt_proj") in out

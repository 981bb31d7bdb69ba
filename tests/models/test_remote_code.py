"""A model folder whose class only its own code defines (``auto_map``): refused unless the caller opts in with
``trust_remote_code`` / ``--trust-remote-code``, and then loaded, quantized, saved and rebuilt like any other."""

from __future__ import annotations

import json

import pytest
import torch

import lowbit
from lowbit.cli import main
from lowbit.errors import InputError
from lowbit.models import build_skeleton, load_model
from lowbit.models.tiny import tiny_hf
from lowbit.plan import QuantPlan

CONFIG_CODE = "from transformers import LlamaConfig\n\n\nclass ToyConfig(LlamaConfig):\n    model_type = 'lowbit_toy'\n"
MODEL_CODE = ("from transformers import LlamaForCausalLM\n\nfrom .configuration_toy import ToyConfig\n\n\n"
              "class ToyForCausalLM(LlamaForCausalLM):\n    config_class = ToyConfig\n")


@pytest.fixture(scope="module")
def remote_folder(tmp_path_factory):
    """(folder, float reference): a tiny Llama saved as the class ``ToyForCausalLM`` of the folder's own code."""
    folder = tmp_path_factory.mktemp("remote") / "toy"
    reference = tiny_hf("llama")
    reference.save_pretrained(folder, safe_serialization=True)
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="lowbit_toy", architectures=["ToyForCausalLM"],
                  auto_map={"AutoConfig": "configuration_toy.ToyConfig",
                            "AutoModelForCausalLM": "modeling_toy.ToyForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "configuration_toy.py").write_text(CONFIG_CODE)
    (folder / "modeling_toy.py").write_text(MODEL_CODE)
    return folder, reference


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_folder_code_is_refused_without_opt_in(remote_folder):
    folder, _ = remote_folder
    with pytest.raises(InputError, match=r"lowbit_toy.*own code.*--trust-remote-code.*trust_remote_code=True"):
        load_model(folder)


def test_trusted_folder_loads_quantizes_saves_and_reloads(remote_folder, tmp_path):
    folder, reference = remote_folder
    lm = load_model(folder, trust_remote_code=True)
    assert lm.kind == "causal-lm" and type(lm.model).__name__ == "ToyForCausalLM"
    assert lm.source["remote_code"] is True
    ids = torch.randint(0, reference.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(_logits(lm.model, ids), _logits(reference, ids))
    lowbit.quantize(lm.model, QuantPlan.uniform("int4-g32-asym"))
    expected = _logits(lm.model, ids)
    lowbit.save(lm.model, tmp_path / "q", source=lm.source)
    with pytest.raises(InputError, match=r"own code.*--trust-remote-code"):
        lowbit.load(tmp_path / "q")  # the recorded source still asks before running the folder's code
    with pytest.raises(InputError, match="own code"):
        build_skeleton(lm.source)
    back = lowbit.load(tmp_path / "q", trust_remote_code=True)
    assert type(back).__name__ == "ToyForCausalLM"
    assert torch.equal(_logits(back, ids), expected)


def test_cli_flag_opts_in(remote_folder, tmp_path, capsys):
    folder, _ = remote_folder
    out = tmp_path / "q"
    assert main(["quantize", str(folder), "--scheme", "int8", "--out", str(out)]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err and not out.exists()
    assert main(["quantize", str(folder), "--scheme", "int8", "--out", str(out), "--trust-remote-code"]) == 0
    assert main(["inspect", str(out)]) == 2
    assert "--trust-remote-code" in capsys.readouterr().err
    assert main(["inspect", str(out), "--trust-remote-code"]) == 0
    assert "model.layers.0.self_attn.q_proj" in capsys.readouterr().out

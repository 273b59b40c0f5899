"""Reading config.json: 4.x and 5.x rope keys, eos ids, and errors that name the file."""

from __future__ import annotations

import json

import pytest
import torch
from model_fixtures import make_tiny_checkpoint

from ppruntime.model import ModelLoadError, config_from_dict, load_model_config
from ppruntime.model.rope import rope_inverse_frequencies


def rewrite_config(directory, change) -> None:
    path = directory / "config.json"
    raw = json.loads(path.read_text())
    change(raw)
    path.write_text(json.dumps(raw))


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("cfg"), "llama", num_hidden_layers=2)


def test_reads_5x_rope_parameters(llama_dir):
    config = load_model_config(llama_dir)
    assert config.architecture == "llama"
    assert config.rope_theta == 10000.0
    assert config.rope_scaling["rope_type"] == "llama3"
    assert config.rope_scaling["original_max_position_embeddings"] == 32
    assert config.head_dim == 16 and config.num_key_value_heads == 2
    assert config.eos_token_ids == (2,) and config.bos_token_id == 1
    assert config.torch_dtype == "float32"


def test_4x_and_5x_configs_give_the_same_model_config(llama_dir, tmp_path):
    def to_4x(raw):
        params = raw.pop("rope_parameters")
        raw["rope_theta"] = params.pop("rope_theta")
        raw["rope_scaling"] = {**params, "type": params.pop("rope_type")}
        raw["torch_dtype"] = raw.pop("dtype", "float32")

    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text((llama_dir / "config.json").read_text())
    rewrite_config(old, to_4x)
    assert "rope_parameters" not in json.loads((old / "config.json").read_text())
    assert load_model_config(old) == load_model_config(llama_dir)


def test_nested_rope_parameters_per_attention_type():
    raw = json.loads(json.dumps(_minimal()))
    plain = {"rope_type": "linear", "rope_theta": 5e5, "factor": 2.0}
    raw["rope_parameters"] = {"full_attention": plain, "sliding_attention": plain}
    config = config_from_dict(raw)
    assert config.rope_theta == 5e5
    base = config_from_dict({**_minimal(), "rope_theta": 5e5})
    torch.testing.assert_close(rope_inverse_frequencies(config), rope_inverse_frequencies(base) / 2)


def test_generation_config_eos_list(llama_dir, tmp_path):
    directory = tmp_path / "m"
    directory.mkdir()
    (directory / "config.json").write_text((llama_dir / "config.json").read_text())
    (directory / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7]}))
    assert load_model_config(directory).eos_token_ids == (2, 7)


def _minimal() -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }


def test_qwen_sliding_window_only_when_enabled():
    raw = {**_minimal(), "architectures": ["Qwen2ForCausalLM"], "sliding_window": 4}
    assert config_from_dict(raw).sliding_window is None
    config = config_from_dict({**raw, "use_sliding_window": True, "max_window_layers": 1})
    assert config.sliding_window_for_layer(0) is None
    assert config.sliding_window_for_layer(1) == 4


@pytest.mark.parametrize(
    "setup, message",
    [
        ("missing_dir", "does not exist"),
        ("missing_config", "config.json not found"),
        ("bad_json", "config.json is not valid JSON"),
        (
            "unsupported_arch",
            "GPT2LMHeadModel is not supported; supported architectures: "
            "LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM",
        ),
        ("missing_field", "required field 'hidden_size' is missing"),
        (
            "unsupported_rope",
            "rope type 'yarn' is not supported; supported rope types: default, linear, llama3",
        ),
    ],
)
def test_config_errors_name_the_file(tmp_path, setup, message):
    directory = tmp_path / "model"
    if setup != "missing_dir":
        directory.mkdir()
    config_path = directory / "config.json"
    raw = _minimal()
    if setup == "bad_json":
        config_path.write_text("{not json")
    elif setup == "unsupported_arch":
        raw["architectures"] = ["GPT2LMHeadModel"]
    elif setup == "missing_field":
        del raw["hidden_size"]
    elif setup == "unsupported_rope":
        raw["rope_parameters"] = {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}
    if setup in ("unsupported_arch", "missing_field", "unsupported_rope"):
        config_path.write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match=message) as info:
        load_model_config(directory)
    assert str(directory) in str(info.value)

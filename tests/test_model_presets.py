"""Presets: configs, partition-independent seeded weights, peaky logits."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from model_fixtures import PagedBatches, load_reference_model

from ppruntime import LLM, SamplingParams
from ppruntime.model import (
    DEFAULT_PRESET,
    PRESETS,
    TRAINED_PRESETS,
    ByteTokenizer,
    StageSpec,
    allocate_kv_cache,
    is_preset,
    load_stage_model,
    partition_layers,
    preset_config,
)


def test_preset_names_and_unknown_name():
    assert {"tiny", "bench-small", "null"} <= set(PRESETS)
    assert is_preset("tiny") and not is_preset("/some/dir")
    assert preset_config("null").num_hidden_layers == 2 and preset_config("null").hidden_size == 8
    with pytest.raises(
        ValueError, match="unknown preset 'huge'; presets: tiny-trained, tiny, bench-small, null"
    ):
        preset_config("huge")
    assert is_preset("tiny-trained") and DEFAULT_PRESET == "tiny-trained"


def test_layer_weights_do_not_depend_on_the_partition():
    as_stage0 = load_stage_model("tiny", StageSpec(0, 2, 0, 2))
    as_stage1 = load_stage_model("tiny", StageSpec(1, 2, 1, 4))
    assert "model.layers.1.mlp.up_proj.weight" in as_stage0.loaded_tensor_names
    assert "model.embed_tokens.weight" not in as_stage1.loaded_tensor_names
    layer_in_0 = dict(as_stage0.layers[1].named_parameters())
    layer_in_1 = dict(as_stage1.layers[0].named_parameters())
    assert layer_in_0.keys() == layer_in_1.keys()
    for name, param in layer_in_0.items():
        assert torch.equal(param, layer_in_1[name]), name
    assert not torch.equal(
        as_stage0.layers[0].mlp.gate_up_proj.weight, as_stage0.layers[1].mlp.gate_up_proj.weight
    )


def test_tiny_logits_are_peaky_and_pipeline_equals_single_stage():
    torch.set_num_threads(1)
    config = preset_config("tiny")
    tokens = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(0))
    outputs = []
    for partition in [(4,), (1, 3)]:
        specs = partition_layers(4, len(partition), partition)
        stages = [load_stage_model("tiny", spec) for spec in specs]
        metadata, positions = PagedBatches(16, 8).step([(0, 10), (1, 14)])
        hidden = tokens
        with torch.no_grad():
            for stage, spec in zip(stages, specs):
                hidden = stage(hidden, positions, metadata, allocate_kv_cache(config, spec, 16, 8))
            outputs.append(stages[-1].compute_logits(hidden))
    torch.testing.assert_close(outputs[0], outputs[1])
    top2 = outputs[0].topk(2).values
    margin = top2[:, 0] - top2[:, 1]
    assert margin.median() > 1.0


def test_preset_bfloat16():
    model = load_stage_model("tiny", StageSpec(0, 1, 0, 4), dtype="bf16")
    assert model.embed_tokens.dtype == torch.bfloat16


# ------------------------------------------------------------------------------------
# the trained preset (shipped checkpoint, scripts/train_tiny.py)
# ------------------------------------------------------------------------------------
KJV_TEXT = Path(__file__).resolve().parent.parent / "data" / "kjv" / "genesis-matthew.txt"


def test_trained_preset_is_small_and_in_the_id_space_of_tiny():
    directory = TRAINED_PRESETS["tiny-trained"]
    assert (directory / "model.safetensors").stat().st_size < 5_000_000
    trained, tiny = preset_config("tiny-trained"), preset_config("tiny")
    assert trained.torch_dtype == "float32"  # bfloat16 on disk, float32 by default
    for field in ("vocab_size", "num_hidden_layers", "bos_token_id", "eos_token_ids"):
        assert getattr(trained, field) == getattr(tiny, field), field
    bf16 = load_stage_model("tiny-trained", StageSpec(0, 1, 0, 4), dtype="bf16")
    assert bf16.embed_tokens.dtype == torch.bfloat16


def test_trained_preset_logits_match_transformers_for_any_partition():
    torch.set_num_threads(1)
    config = preset_config("tiny-trained")
    reference = load_reference_model(TRAINED_PRESETS["tiny-trained"])
    prompt = ByteTokenizer(config.vocab_size).encode("And God said unto Abraham")
    tokens = torch.from_numpy(prompt).long()
    with torch.no_grad():
        expected = reference(input_ids=tokens[None]).logits[0]
    for partition in [(4,), (1, 3)]:
        specs = partition_layers(4, len(partition), partition)
        stages = [load_stage_model("tiny-trained", spec) for spec in specs]
        metadata, positions = PagedBatches(16, 8).step([(0, len(tokens))])
        hidden = tokens
        with torch.no_grad():
            for stage, spec in zip(stages, specs):
                hidden = stage(hidden, positions, metadata, allocate_kv_cache(config, spec, 16, 8))
            logits = stages[-1].compute_logits(hidden)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=1e-4)


def test_default_model_continues_a_prompt_with_words_of_its_text():
    known = set(re.findall(r"[a-z]+", KJV_TEXT.read_text().lower()))
    with LLM(deterministic=True, exit_workers=False) as llm:  # no model, no preset
        assert llm.config.model == DEFAULT_PRESET
        outputs = llm.generate(
            ["And God said", "In the beginning"],
            SamplingParams(max_tokens=48, temperature=0),
            use_tqdm=False,
        )
    for output in outputs:
        words = re.findall(r"[a-z]+", output.text.lower())[:-1]  # the last may be cut off
        assert len(words) >= 6, output.text
        assert sum(word in known for word in words) >= 0.9 * len(words), output.text


def test_train_script_is_reproducible_and_writes_a_loadable_checkpoint(tmp_path):
    script = Path(__file__).resolve().parent.parent / "scripts" / "train_tiny.py"
    short = ["--steps", "3", "--batch-size", "2", "--seq-len", "32", "--warmup-steps", "1"]
    runs = [
        subprocess.Popen(
            [sys.executable, str(script), *short, "--out", str(tmp_path / name)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for name in ("a", "b")
    ]
    for run in runs:
        output, _ = run.communicate(timeout=240)
        assert run.returncode == 0, output
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("a", "b")]
    assert weights[0] == weights[1]  # the same seed, the same bytes
    model = load_stage_model(str(tmp_path / "a"), StageSpec(0, 1, 0, 4))
    assert model.embed_tokens.shape == (512, 192)

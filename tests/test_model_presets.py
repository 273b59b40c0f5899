"""Presets: configs, partition-independent seeded weights, peaky logits."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import PagedBatches

from ppruntime.model import (
    PRESETS,
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
    with pytest.raises(ValueError, match="unknown preset 'huge'; presets: tiny, bench-small, null"):
        preset_config("huge")


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

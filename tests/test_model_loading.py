"""Checkpoint loading: per-stage tensor reads, sharded files, tied heads, dtypes, errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from model_fixtures import PagedBatches, load_reference_model, make_tiny_checkpoint
from safetensors.torch import load_file, save_file

from ppruntime.model import (
    ModelLoadError,
    StageSpec,
    allocate_kv_cache,
    kv_cache_bytes_per_block,
    load_model_config,
    load_stage_model,
    partition_layers,
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("load"), "llama", num_hidden_layers=4)


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    return make_tiny_checkpoint(
        tmp_path_factory.mktemp("shard"), "qwen2", num_hidden_layers=4, max_shard_size="60KB"
    )


@pytest.fixture
def llama_copy(llama_dir, tmp_path):
    directory = tmp_path / "copy"
    shutil.copytree(llama_dir, directory)
    return directory


def layer_numbers(names) -> set[int]:
    return {int(n.split(".")[2]) for n in names if n.startswith("model.layers.")}


def test_each_stage_reads_only_its_tensors(llama_dir):
    stages = partition_layers(4, 3, (1, 2, 1))
    models = [load_stage_model(llama_dir, spec) for spec in stages]
    first, middle, last = (set(m.loaded_tensor_names) for m in models)
    assert layer_numbers(first) == {0} and "model.embed_tokens.weight" in first
    assert "lm_head.weight" not in first and "model.norm.weight" not in first
    assert layer_numbers(middle) == {1, 2}
    assert not any(n.startswith(("lm_head", "model.embed", "model.norm")) for n in middle)
    assert layer_numbers(last) == {3} and {"lm_head.weight", "model.norm.weight"} <= last
    assert "model.embed_tokens.weight" not in last
    assert models[1].embed_tokens is None and models[1].lm_head is None
    with pytest.raises(RuntimeError, match="only the last stage"):
        models[0].compute_logits(torch.zeros(1, 64))


def test_sharded_checkpoint_with_tied_head_on_another_stage(sharded_dir):
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    assert len(list(sharded_dir.glob("model-*.safetensors"))) > 1
    config = load_model_config(sharded_dir)
    assert config.tie_word_embeddings
    specs = partition_layers(4, 2)
    first, last = (load_stage_model(sharded_dir, spec) for spec in specs)
    assert "model.embed_tokens.weight" in last.loaded_tensor_names  # read for the tied head
    assert "lm_head.weight" not in last.loaded_tensor_names
    torch.testing.assert_close(last.lm_head, first.embed_tokens)

    reference = load_reference_model(sharded_dir)
    tokens = torch.arange(3, 14)
    caches = [allocate_kv_cache(config, spec, 16, 4) for spec in specs]
    metadata, positions = PagedBatches(16, 4).step([(0, len(tokens))])
    with torch.no_grad():
        hidden = first(tokens, positions, metadata, caches[0])
        logits = last.compute_logits(last(hidden, positions, metadata, caches[1]))
        expected = reference(tokens[None]).logits[0]
    torch.testing.assert_close(logits, expected, atol=1e-4 * expected.abs().max(), rtol=1e-4)


def test_single_stage_tied_head_shares_the_embedding(sharded_dir):
    model = load_stage_model(sharded_dir, StageSpec(0, 1, 0, 4))
    assert model.lm_head is model.embed_tokens


def test_auto_dtype_and_bfloat16(llama_dir):
    spec = StageSpec(0, 1, 0, 4)
    assert load_stage_model(llama_dir, spec, dtype="auto").embed_tokens.dtype == torch.float32
    model = load_stage_model(llama_dir, spec, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_kv_cache_shape_and_bytes(llama_dir):
    config = load_model_config(llama_dir)
    spec = StageSpec(1, 2, 1, 4)
    cache = allocate_kv_cache(config, spec, num_blocks=5, block_size=8, dtype=torch.float16)
    assert cache.shape == (3, 2, 5, 8, 2, 16)
    assert kv_cache_bytes_per_block(config, spec, 8, torch.float16) == 3 * 2 * 8 * 2 * 16 * 2


def _drop_tensor(path, name):
    tensors = load_file(path)
    del tensors[name]
    save_file(tensors, path, metadata={"format": "pt"})


def _reshape_tensor(path, name):
    tensors = load_file(path)
    tensors[name] = torch.zeros(3, 3)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor(llama_copy):
    _drop_tensor(llama_copy / "model.safetensors", "model.layers.2.mlp.up_proj.weight")
    with pytest.raises(ModelLoadError, match="tensor model.layers.2.mlp.up_proj.weight not found"):
        load_stage_model(llama_copy, StageSpec(1, 2, 2, 4))
    load_stage_model(llama_copy, StageSpec(0, 2, 0, 2))  # the other stage does not need it


def test_missing_tensor_in_shard_names_shard_and_index(sharded_dir, tmp_path):
    directory = tmp_path / "sharded"
    shutil.copytree(sharded_dir, directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    name = "model.layers.3.mlp.up_proj.weight"
    shard = directory / index["weight_map"][name]
    _drop_tensor(shard, name)
    expected = f"tensor {name} not found in {shard} (referenced by model.safetensors.index.json)"
    with pytest.raises(ModelLoadError) as info:
        load_stage_model(directory, StageSpec(1, 2, 2, 4))
    assert str(info.value) == expected


def test_missing_shard_file(sharded_dir, tmp_path):
    directory = tmp_path / "sharded"
    shutil.copytree(sharded_dir, directory)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    shard = directory / index["weight_map"]["model.norm.weight"]
    shard.unlink()
    with pytest.raises(ModelLoadError, match=f"safetensors file {shard} not found"):
        load_stage_model(directory, StageSpec(1, 2, 2, 4))


def test_wrong_shape(llama_copy):
    _reshape_tensor(llama_copy / "model.safetensors", "model.layers.0.self_attn.k_proj.weight")
    with pytest.raises(
        ModelLoadError, match=r"has shape \[3, 3\] but the model config expects \[32, 64\]"
    ):
        load_stage_model(llama_copy, StageSpec(0, 1, 0, 4))


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors(llama_copy, damage):
    path = llama_copy / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x07" * 64)
    with pytest.raises(ModelLoadError, match=f"cannot read {path}: corrupt or truncated"):
        load_stage_model(llama_copy, StageSpec(0, 1, 0, 4))


def test_no_weight_files(llama_copy):
    (llama_copy / "model.safetensors").unlink()
    with pytest.raises(
        ModelLoadError, match="expected model.safetensors or model.safetensors.index"
    ):
        load_stage_model(llama_copy, StageSpec(0, 1, 0, 4))


def test_unsupported_dtype(llama_dir):
    with pytest.raises(
        ModelLoadError,
        match="dtype 'int8' is not supported; supported dtypes: float32, bfloat16, float16, auto",
    ):
        load_stage_model(llama_dir, StageSpec(0, 1, 0, 4), dtype="int8")
    with pytest.raises(ModelLoadError, match="'float64' is not supported"):
        load_stage_model(llama_dir, StageSpec(0, 1, 0, 4), dtype=torch.float64)


def test_stage_beyond_the_model(llama_dir):
    with pytest.raises(ModelLoadError, match="has 4 layers"):
        load_stage_model(llama_dir, StageSpec(1, 2, 2, 6))

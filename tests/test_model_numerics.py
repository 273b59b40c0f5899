"""ppruntime stage models vs transformers (eager, float32): logits through the paged cache,
for every architecture and several pipeline partitions, in mixed varlen batches."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import ARCHITECTURES, PagedBatches, load_reference_model, make_tiny_checkpoint

from ppruntime.model import (
    allocate_kv_cache,
    load_model_config,
    load_stage_model,
    partition_layers,
)

BLOCK_SIZE = 4
NUM_BLOCKS = 48
PARTITIONS = [(5,), (2, 3), (1, 3, 1)]

# Per step: (sequence id, new tokens). Sequence 0 prefills then decodes while sequence 1
# prefills in chunks that attend to their cached prefix; sequence 2 joins late.
SCHEDULE = [
    [(0, 9), (1, 5)],
    [(0, 1), (1, 7)],
    [(0, 1), (1, 6), (2, 3)],
    [(0, 1), (1, 1), (2, 1)],
    [(1, 1), (0, 1), (2, 1)],
]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """arch -> (checkpoint dir, reference logits per sequence [L, V], token ids per sequence)."""
    built = {}
    for arch in ARCHITECTURES:
        directory = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), arch)
        built[arch] = (directory, *reference_run(directory))
    return built


def run_pipeline(stages, caches, token_ids, positions, metadata) -> torch.Tensor:
    """Run the stages in order in one process, as the pipeline would; -> logits [T, V]."""
    hidden = token_ids
    for model, cache in zip(stages, caches):
        hidden = model(hidden, positions, metadata, cache)
    return stages[-1].compute_logits(hidden)


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(actual, expected, atol=1e-4 * scale, rtol=1e-4)


def reference_run(directory, seed: int = 7):
    """(reference logits per sequence [L, V], token ids per sequence) for SCHEDULE."""
    reference = load_reference_model(directory)
    generator = torch.Generator().manual_seed(seed)
    totals: dict[int, int] = {}
    for step in SCHEDULE:
        for seq_id, count in step:
            totals[seq_id] = totals.get(seq_id, 0) + count
    vocab = reference.config.vocab_size
    tokens = {s: torch.randint(3, vocab, (n,), generator=generator) for s, n in totals.items()}
    with torch.no_grad():
        logits = {s: reference(ids[None]).logits[0] for s, ids in tokens.items()}
    return logits, tokens


def check_schedule_against_reference(directory, reference_logits, tokens, partition) -> None:
    """Run SCHEDULE through the stages of `partition`; every step's logits must match."""
    config = load_model_config(directory)
    stage_specs = partition_layers(config.num_hidden_layers, len(partition), partition)
    stages = [load_stage_model(directory, spec) for spec in stage_specs]
    caches = [allocate_kv_cache(config, spec, NUM_BLOCKS, BLOCK_SIZE) for spec in stage_specs]
    paging = PagedBatches(NUM_BLOCKS, BLOCK_SIZE, seed=len(partition))
    for step in SCHEDULE:
        starts = {seq_id: paging.lengths.get(seq_id, 0) for seq_id, _ in step}
        metadata, positions = paging.step(step)
        token_ids = torch.cat([tokens[s][starts[s] : starts[s] + n] for s, n in step])
        expected = torch.cat([reference_logits[s][starts[s] : starts[s] + n] for s, n in step])
        with torch.no_grad():
            logits = run_pipeline(stages, caches, token_ids.to(torch.int32), positions, metadata)
        assert_logits_close(logits, expected)


@pytest.mark.parametrize("partition", PARTITIONS, ids=lambda p: "-".join(map(str, p)))
@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_stage_logits_match_transformers(checkpoints, arch, partition):
    directory, reference_logits, tokens = checkpoints[arch]
    check_schedule_against_reference(directory, reference_logits, tokens, partition)


@pytest.mark.parametrize(
    "arch, overrides",
    [
        (
            "llama",
            {
                "attention_bias": True,
                "mlp_bias": True,
                "rope_parameters": {"rope_type": "linear", "rope_theta": 500.0, "factor": 3.0},
            },
        ),
        ("qwen3", {"attention_bias": True, "tie_word_embeddings": True}),
    ],
)
def test_optional_features_match_transformers(tmp_path, arch, overrides):
    directory = make_tiny_checkpoint(tmp_path, arch, num_hidden_layers=3, **overrides)
    reference_logits, tokens = reference_run(directory)
    check_schedule_against_reference(directory, reference_logits, tokens, (2, 1))


def test_mistral_sliding_window_is_exercised(checkpoints):
    """The mistral fixture's window (6) is shorter than its sequences, so the mask matters."""
    directory, _, tokens = checkpoints["mistral"]
    config = load_model_config(directory)
    assert config.sliding_window == 6
    assert max(len(ids) for ids in tokens.values()) > 2 * config.sliding_window


def test_bfloat16_stage_runs_close_to_float32(checkpoints):
    directory, reference_logits, tokens = checkpoints["llama"]
    config = load_model_config(directory)
    (spec,) = partition_layers(config.num_hidden_layers, 1)
    model = load_stage_model(directory, spec, dtype="bfloat16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    cache = allocate_kv_cache(config, spec, NUM_BLOCKS, BLOCK_SIZE, dtype=torch.bfloat16)
    metadata, positions = PagedBatches(NUM_BLOCKS, BLOCK_SIZE).step([(0, 9)])
    with torch.no_grad():
        logits = model.compute_logits(model(tokens[0][:9], positions, metadata, cache))
    expected = reference_logits[0][:9]
    assert logits.dtype == torch.float32
    scale = expected.abs().max().item()
    assert (logits - expected).abs().max().item() < 0.1 * scale

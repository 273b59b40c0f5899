"""`--layer-partition auto`: the pure choice on made-up costs, the costs file, and MPI
runs whose auto partition (from a costs file, or measured with one rank slowed down)
splits the layers unevenly and still matches transformers."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from launching import REPO_ROOT, describe, mpi_env, run_mpi
from model_fixtures import load_reference_model, make_tiny_checkpoint
from reference_compare import compare_greedy, hf_greedy_reference

from ppruntime.config import ConfigError, ParallelConfig
from ppruntime.engine.partition_costs import (
    predicted_stage_times,
    read_partition_costs,
    write_partition_costs,
)
from ppruntime.model.partition import (
    PartitionError,
    RankCosts,
    StageBytes,
    balance_by_cost,
)

TIMEOUT_S = 180
PROMPTS = [[5, 6, 7], list(range(10, 23))]
MAX_NEW_TOKENS = 10


# -- the pure choice ---------------------------------------------------------------------
def test_equal_ranks_split_evenly():
    partition = balance_by_cost(8, [RankCosts(layer_s=1.0)] * 2)
    assert partition.counts == (4, 4)
    assert partition.stage_times == (4.0, 4.0)
    assert partition.imbalance == 1.0


def test_head_cost_moves_layers_off_the_last_stage():
    partition = balance_by_cost(8, [RankCosts(layer_s=1.0, head_s=2.0)] * 2)
    assert partition.counts == (5, 3)
    assert partition.slowest_s == 5.0


def test_slow_rank_gets_fewer_layers():
    fast, slow = RankCosts(layer_s=1.0), RankCosts(layer_s=3.0)
    assert balance_by_cost(8, [fast, slow]).counts == (6, 2)
    assert balance_by_cost(8, [slow, fast]).counts == (2, 6)
    delayed = RankCosts(layer_s=1.0, fixed_s=4.0)  # PPRUNTIME_STAGE_DELAY_MS-like
    assert balance_by_cost(8, [fast, delayed]).counts == (6, 2)


def test_minimises_the_slowest_stage_exactly():
    """Brute force over every contiguous split of 9 layers on 3 uneven ranks."""
    costs = [
        RankCosts(layer_s=1.0, embed_s=0.5),
        RankCosts(layer_s=1.7, fixed_s=0.3),
        RankCosts(layer_s=1.2, head_s=2.5),
    ]
    best = min(
        max(predicted_stage_times((a, b, 9 - a - b), costs))
        for a in range(1, 8)
        for b in range(1, 9 - a)
    )
    partition = balance_by_cost(9, costs)
    assert sum(partition.counts) == 9
    assert partition.slowest_s == pytest.approx(best)
    assert partition.stage_times == predicted_stage_times(partition.counts, costs)


def test_memory_limit_forces_an_uneven_split():
    sizes = StageBytes(layer=10, embed=5, head=5)
    small = RankCosts(layer_s=1.0, memory_bytes=35)  # embedding + 3 layers at most
    roomy = RankCosts(layer_s=1.0, memory_bytes=1000)
    partition = balance_by_cost(8, [small, roomy], sizes)
    assert partition.counts == (3, 5)
    # without the limit the same costs split evenly
    assert balance_by_cost(8, [RankCosts(layer_s=1.0)] * 2, sizes).counts == (4, 4)


def test_no_split_fits_memory():
    sizes = StageBytes(layer=10)
    tight = RankCosts(layer_s=1.0, memory_bytes=25)
    with pytest.raises(PartitionError, match="fits every rank's memory"):
        balance_by_cost(8, [tight, tight], sizes)


def test_more_ranks_than_layers_is_refused():
    with pytest.raises(PartitionError, match="only 2 layers"):
        balance_by_cost(2, [RankCosts(layer_s=1.0)] * 3)


def test_same_costs_same_choice():
    costs = [RankCosts(layer_s=1.0 + 0.1 * r, head_s=0.3 * r) for r in range(4)]
    assert {balance_by_cost(16, costs).counts for _ in range(5)} == {
        balance_by_cost(16, costs).counts
    }


# -- configuration and the costs file ------------------------------------------------------
def test_parallel_config_accepts_auto_only():
    assert ParallelConfig(pp_size=2, layer_partition="auto").layer_partition == "auto"
    with pytest.raises(ConfigError, match="'even'"):
        ParallelConfig(pp_size=2, layer_partition="even")
    with pytest.raises(ConfigError, match="only used with layer_partition='auto'"):
        ParallelConfig(pp_size=2, partition_costs="costs.json")
    with pytest.raises(ConfigError, match="partition_decode_fraction"):
        ParallelConfig(pp_size=2, layer_partition="auto", partition_decode_fraction=1.5)


def test_costs_file_round_trip(tmp_path):
    path = str(tmp_path / "costs.json")
    costs = [RankCosts(0.5, 0.1, 0.2, 0.0, None), RankCosts(0.7, 0.1, 0.3, 0.02, 1 << 30)]
    sizes = StageBytes(layer=100, embed=20, head=21)
    write_partition_costs(path, costs, sizes)
    assert read_partition_costs(path, 2) == (costs, sizes)
    with pytest.raises(ConfigError, match="costs of 2 ranks but pp_size=3"):
        read_partition_costs(path, 3)


@pytest.mark.parametrize(
    "content, message",
    [
        ("not json", "not a JSON file"),
        ('{"version": 7, "ranks": []}', "version 1"),
        ('{"version": 1, "sizes": {"layer": 1}, "ranks": [{"embed_s": 1}]}', "malformed"),
        ('{"version": 1, "sizes": {"layer": 1}, "ranks": [{"layer_s": -1}]}', "negative"),
    ],
)
def test_bad_costs_file(tmp_path, content, message):
    path = tmp_path / "costs.json"
    path.write_text(content)
    with pytest.raises((ConfigError, PartitionError), match=message):
        read_partition_costs(str(path), 1)


def test_missing_costs_file(tmp_path):
    with pytest.raises(ConfigError, match="--partition-costs .*missing.json"):
        read_partition_costs(str(tmp_path / "missing.json"), 2)


# -- MPI runs ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A 4-layer llama checkpoint and transformers' greedy tokens for PROMPTS."""
    directory = make_tiny_checkpoint(tmp_path_factory.mktemp("auto"), "llama", num_hidden_layers=4)
    reference = hf_greedy_reference(load_reference_model(directory), PROMPTS, MAX_NEW_TOKENS)
    return directory, reference


def _prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt_token_ids": p}) + "\n" for p in PROMPTS))
    return str(path)


def _generate_args(model_args, prompts_file, extra=()):
    return [
        sys.executable,
        "-m",
        "ppruntime",
        "generate",
        *model_args,
        "--prompts-file",
        prompts_file,
        "--max-tokens",
        str(MAX_NEW_TOKENS),
        "--ignore-eos",
        "--block-size",
        "4",
        "--json",
        "--quiet",
        "--deterministic",
        "--layer-partition",
        "auto",
        *extra,
    ]


@pytest.mark.parametrize(
    "pp, rank_layer_s, expected",
    [
        (2, [3.0, 1.0], "1,3"),  # rank 0 three times slower than rank 1
        (3, [1.0, 2.0, 1.5], "2,1,1"),
    ],
    ids=["pp2", "pp3"],
)
def test_auto_partition_from_costs_matches_transformers(
    tmp_path, checkpoint, pp, rank_layer_s, expected
):
    """Made-up costs force an uneven split; the tokens still equal transformers'."""
    directory, reference = checkpoint
    costs_path = str(tmp_path / "costs.json")
    costs = [RankCosts(layer_s=value) for value in rank_layer_s]
    write_partition_costs(costs_path, costs, StageBytes(layer=1))
    result = run_mpi(
        pp,
        _generate_args(
            ["--model", str(directory)],
            _prompts_file(tmp_path),
            ["--partition-costs", costs_path],
        ),
        env=mpi_env(),
        timeout=TIMEOUT_S,
    )
    out, err = result.stdout, result.stderr
    assert result.returncode == 0, describe(result)
    assert f"layer partition auto: {expected} " in err, err[-3000:]
    ours = [json.loads(line)["token_ids"] for line in out.splitlines() if line.startswith("{")]
    mismatches = compare_greedy(
        reference.tokens, reference.top2_logprobs, ours, reference_top2_ids=reference.top2_ids
    )
    assert not mismatches, "\n".join(mismatches)


def test_measured_costs_give_a_delayed_rank_fewer_layers(tmp_path):
    """A real measurement: rank 1 sleeps 100 ms per forward, far more than the tiny
    model's layers cost, so `auto` leaves it the one layer it must hold."""
    result = run_mpi(
        2,
        _generate_args(
            ["--preset", "tiny"],
            _prompts_file(tmp_path),
            ["--max-batch-size", "4", "--max-num-tokens", "64"],
        ),
        env=mpi_env({"PPRUNTIME_STAGE_DELAY_MS": "1:100"}),
        timeout=TIMEOUT_S,
    )
    out, err = result.stdout, result.stderr
    assert result.returncode == 0, describe(result)
    assert "layer partition auto: 3,1 " in err, err[-3000:]
    assert len([line for line in out.splitlines() if line.startswith("{")]) == len(PROMPTS)


def test_info_dry_run_writes_reusable_costs(tmp_path):
    costs_path = tmp_path / "costs.json"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ppruntime",
            "info",
            "--preset",
            "tiny",
            "--pp-size",
            "2",
            "--max-batch-size",
            "4",
            "--max-num-tokens",
            "64",
            "--json",
            "--partition-costs",
            str(costs_path),
        ],
        cwd=str(REPO_ROOT),
        env=mpi_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert sum(summary["auto_partition"]) == 4
    assert len(summary["auto_stage_s"]) == 2 and summary["auto_imbalance"] >= 1.0
    assert summary["default_partition"] == [2, 2]
    costs, _ = read_partition_costs(str(costs_path), 2)
    assert costs[0] == costs[1]  # alone, the one rank's costs stand for both
    assert costs[0].layer_s > 0

"""Per-rank costs for `--layer-partition auto`: measured here, or kept in a JSON file.

The file (written by `ppruntime info --model DIR --partition-costs FILE`) holds one
entry per rank, so a later run can reuse a measurement and choose the same partition
(deterministic mode stays deterministic):

    {"version": 1, "sizes": {"layer": ..., "embed": ..., "head": ...},
     "ranks": [{"layer_s": ..., "embed_s": ..., "head_s": ..., "fixed_s": ...,
                "memory_bytes": ...}, ...]}
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TypeVar

import torch

from ppruntime.config import ConfigError, EngineConfig, env_flag
from ppruntime.model import (
    ModelConfig,
    kv_cache_bytes_per_block,
    resolve_dtype,
    select_attention_backend,
    select_layer_ops,
)
from ppruntime.model.partition import (
    CostBalancedPartition,
    RankCosts,
    StageBytes,
    StageSpec,
)
from ppruntime.stage.cost_probe import ProbeWorkload, measure_rank_costs, probe_timers
from ppruntime.stage.debug_knobs import StageKnobs

COSTS_FILE_VERSION = 1
T = TypeVar("T")


def measure_costs_for(
    config: EngineConfig, model_config: ModelConfig, device: torch.device, rank: int
) -> tuple[RankCosts, StageBytes]:
    """This rank's costs for the engine's workload, device, dtype and memory."""
    dtype = resolve_dtype(config.dtype, model_config)
    workload = ProbeWorkload(
        max_batch_size=config.max_batch_size,
        max_num_tokens=config.max_num_tokens,
        block_size=config.block_size,
        decode_fraction=config.parallel.partition_decode_fraction,
        decode_context=config.parallel.partition_decode_context,
    )
    limit = _weight_memory_limit(config, device)  # before the probe's models take memory
    costs, sizes = measure_rank_costs(
        model_config,
        workload,
        dtype,
        device,
        knobs=StageKnobs.from_env(rank),
        memory_bytes=None,
        attention_backend=select_attention_backend(config.attention_backend, device),
        layer_ops=select_layer_ops(config.attention_backend, device),
        cuda_graphs=config.cuda_graphs,
        force_cuda_graphs=bool(env_flag("PPRUNTIME_FORCE_CUDA_GRAPHS")),
    )
    if config.kv_cache_blocks is not None:
        # a fixed block count: every layer a stage holds brings its share of the cache
        one_layer = StageSpec(0, 1, 0, 1)
        per_layer = kv_cache_bytes_per_block(model_config, one_layer, config.block_size, dtype)
        sizes = StageBytes(
            sizes.layer + config.kv_cache_blocks * per_layer, sizes.embed, sizes.head
        )
    if limit is not None:
        costs = RankCosts(costs.layer_s, costs.embed_s, costs.head_s, costs.fixed_s, limit)
    return costs, sizes


def probe_key(device: torch.device, host: str) -> str | None:
    """What this rank's probe shares its timing with: its device when ranks on one
    device must probe one after the other (a GPU time-slices between processes, so a
    probe would time the other ranks' kernels too); None when ranks probe at once."""
    shared = probe_timers(device, decode_graphs=False).shared_device
    return None if shared is None else f"{host}/{shared}"


def probe_turns(keys: list[str | None]) -> list[int]:
    """The turn (0, 1, ...) in which each rank probes: ranks of one key one after the
    other, in rank order; every other rank in the first turn."""
    seen: dict[str, int] = {}
    turns = []
    for key in keys:
        if key is None:
            turns.append(0)
            continue
        turns.append(seen.get(key, 0))
        seen[key] = turns[-1] + 1
    return turns


def measure_in_turns(comm, key: str | None, measure: Callable[[], T]) -> T | None:
    """measure() on every rank of the MPI communicator `comm` (a collective call), ranks
    of one `probe_key` one after the other; None where a rank's measure raised (the
    error is re-raised after the last turn, so no rank is left at a barrier)."""
    turns = probe_turns(comm.allgather(key))
    result, error = None, None
    for turn in range(max(turns) + 1):
        if turns[comm.Get_rank()] == turn:
            try:
                result = measure()
            except Exception as exc:  # re-raised below, after the last barrier
                error = exc
        comm.Barrier()
    if error is not None:
        raise error
    return result


def _weight_memory_limit(config: EngineConfig, device: torch.device) -> int | None:
    """Bytes this rank may fill with weights: a GPU's free memory less the KV budget.

    None on CPU: host memory is not modelled (ranks of one host share it).
    """
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    kv_budget = 0 if config.kv_cache_blocks is not None else config.kv_cache_memory_mb * 2**20
    return max(int(free * 0.9) - kv_budget, 0)


def write_partition_costs(path: str, costs: list[RankCosts], sizes: StageBytes) -> None:
    data = {
        "version": COSTS_FILE_VERSION,
        "sizes": {"layer": sizes.layer, "embed": sizes.embed, "head": sizes.head},
        "ranks": [entry.to_dict() for entry in costs],
    }
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1)
    os.replace(temporary, path)


def read_partition_costs(path: str, pp_size: int) -> tuple[list[RankCosts], StageBytes]:
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except OSError as error:
        raise ConfigError(f"--partition-costs {path}: {error.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConfigError(f"--partition-costs {path} is not a JSON file: {error}") from None
    if not isinstance(data, dict) or data.get("version") != COSTS_FILE_VERSION:
        raise ConfigError(
            f"--partition-costs {path}: not a partition-costs file of version "
            f"{COSTS_FILE_VERSION} (write one with `ppruntime info --model DIR --pp-size N "
            "--partition-costs FILE`)"
        )
    ranks = data.get("ranks")
    if not isinstance(ranks, list) or len(ranks) != pp_size:
        count = len(ranks) if isinstance(ranks, list) else 0
        raise ConfigError(
            f"--partition-costs {path} holds the costs of {count} ranks but pp_size={pp_size}: "
            "measure again with the same --pp-size"
        )
    try:
        sizes = StageBytes(**{key: int(value) for key, value in data["sizes"].items()})
        costs = [RankCosts.from_dict(entry) for entry in ranks]
    except (KeyError, TypeError, ValueError) as error:
        raise ConfigError(f"--partition-costs {path} is malformed: {error}") from None
    return costs, sizes


def describe_partition(partition: CostBalancedPartition) -> str:
    times = ", ".join(f"{t * 1e3:.2f}" for t in partition.stage_times)
    return (
        f"{','.join(map(str, partition.counts))} (predicted ms per microbatch by stage: "
        f"{times}; slowest/fastest {partition.imbalance:.3f})"
    )


def predicted_stage_times(counts: tuple[int, ...], costs: list[RankCosts]) -> tuple[float, ...]:
    """What the cost model predicts per stage for a given split (e.g. the default one)."""
    last = len(counts) - 1
    return tuple(
        costs[stage].stage_time(count, stage == 0, stage == last)
        for stage, count in enumerate(counts)
    )

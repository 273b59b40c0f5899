"""`ppruntime info --model DIR --pp-size N`: a dry run of `--layer-partition auto`.

Every rank measures its costs (nothing of the checkpoint but its config is read);
rank 0 prints the partition `auto` would choose beside the default one, with each
stage's predicted time, and with `--partition-costs FILE` writes the measurement for
later runs to reuse. Alone (no mpirun) with `--pp-size N`, the one rank's costs
stand for all N ranks.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the parser is built without MPI or torch: imported by the dry run
    from ppruntime.comm.mpi_env import RankInfo

EXIT_BAD_INPUT = 2


def add_partition_dry_run_arguments(parser: argparse.ArgumentParser) -> None:
    from ppruntime.api.cli_generate import add_partition_cost_arguments

    group = parser.add_argument_group("partition dry run (with --model or --preset)")
    model = group.add_mutually_exclusive_group()
    model.add_argument("--model", help="checkpoint directory: print the auto layer partition")
    model.add_argument("--preset", help="built-in model: print the auto layer partition")
    group.add_argument("--pp-size", type=int, default=None, help="default: the MPI world size")
    group.add_argument("--dtype", default="auto")
    group.add_argument("--device", default=None)
    group.add_argument("--max-batch-size", type=int, default=64)
    group.add_argument("--max-num-tokens", type=int, default=1024)
    group.add_argument("--block-size", type=int, default=16)
    group.add_argument("--kv-cache-blocks", type=int, default=None)
    add_partition_cost_arguments(group)


def run_partition_dry_run(args: argparse.Namespace, info: RankInfo) -> int:
    from mpi4py import MPI

    from ppruntime.config import AUTO_PARTITION, ConfigError, EngineConfig, ParallelConfig
    from ppruntime.device import select_device
    from ppruntime.engine.partition_costs import (
        describe_partition,
        measure_costs_for,
        measure_in_turns,
        predicted_stage_times,
        probe_key,
        write_partition_costs,
    )
    from ppruntime.model import load_config, partition_layers, stage_extra_costs
    from ppruntime.model.partition import balance_by_cost

    comm = MPI.COMM_WORLD
    pp_size = args.pp_size or info.size
    result, error = None, None
    try:
        if info.size not in (1, pp_size):
            raise ConfigError(
                f"--pp-size {pp_size} under mpirun -n {info.size}: run the dry run with as "
                "many ranks as stages, or alone"
            )
        config = EngineConfig(
            model=args.model or args.preset or "tiny",
            parallel=ParallelConfig(
                pp_size=pp_size,
                layer_partition=AUTO_PARTITION,
                partition_decode_fraction=args.partition_decode_fraction,
                partition_decode_context=args.partition_decode_context,
            ),
            dtype=args.dtype,
            device=args.device,
            max_batch_size=args.max_batch_size,
            max_num_tokens=args.max_num_tokens,
            block_size=args.block_size,
            kv_cache_blocks=args.kv_cache_blocks,
        )
        model_config = load_config(config.model)
        device = select_device(info.local_rank, config.device)
        key = probe_key(device, info.host)
    except (ValueError, OSError) as exc:
        error, key = f"rank {info.rank}: {exc}", None
    try:  # ranks sharing a GPU measure one after the other
        result = measure_in_turns(
            comm,
            key,
            lambda: None if error else measure_costs_for(config, model_config, device, info.rank),
        )
    except (ValueError, OSError) as exc:
        error = f"rank {info.rank}: {exc}"
    gathered = comm.gather((result, error), root=0)
    if info.rank != 0:
        return 0
    errors = [entry[1] for entry in gathered if entry[1] is not None]
    if errors:
        print(f"ppruntime info: error: {'; '.join(errors)}", flush=True)
        return EXIT_BAD_INPUT
    costs = [entry[0][0] for entry in gathered]
    sizes = gathered[0][0][1]
    if len(costs) == 1:
        costs = costs * pp_size
    num_layers = model_config.num_hidden_layers
    try:
        auto = balance_by_cost(num_layers, costs, sizes)
    except ValueError as exc:
        print(f"ppruntime info: error: {exc}", flush=True)
        return EXIT_BAD_INPUT
    first, last = stage_extra_costs(model_config)
    default = tuple(
        stage.num_layers
        for stage in partition_layers(
            num_layers, pp_size, None, first_stage_extra_cost=first, last_stage_extra_cost=last
        )
    )
    default_times = predicted_stage_times(default, costs)
    if args.partition_costs:
        write_partition_costs(args.partition_costs, costs, sizes)
    summary = {
        "pp_size": pp_size,
        "auto_partition": list(auto.counts),
        "auto_stage_s": list(auto.stage_times),
        "auto_imbalance": auto.imbalance,
        "default_partition": list(default),
        "default_stage_s": list(default_times),
        "default_imbalance": max(default_times) / min(default_times),
        "costs": [entry.to_dict() for entry in costs],
    }
    if args.json:
        print(json.dumps(summary), flush=True)
        return 0
    print(f"layer partition auto:    {describe_partition(auto)}")
    print(
        f"layer partition default: {','.join(map(str, default))} (predicted ms per microbatch "
        f"by stage: {', '.join(f'{t * 1e3:.2f}' for t in default_times)}; slowest/fastest "
        f"{summary['default_imbalance']:.3f})"
    )
    for rank, entry in enumerate(costs):
        print(
            f"  rank {rank}: layer {entry.layer_s * 1e3:.3f} ms, embedding "
            f"{entry.embed_s * 1e3:.3f} ms, head {entry.head_s * 1e3:.3f} ms, fixed "
            f"{entry.fixed_s * 1e3:.3f} ms"
        )
    if args.partition_costs:
        print(f"costs written to {args.partition_costs}")
    return 0

#!/usr/bin/env python
"""Pipeline throughput benchmark (issue 6): a fixed workload on the bench-small preset.

    python scripts/bench_pipeline.py --pp 2 --json           # one run
    python scripts/bench_pipeline.py --compare 2 --json      # PP=1 vs PP=2: efficiency
    python scripts/bench_pipeline.py --uneven --json         # 1:2 stages: bound_ratio, async vs det
    python scripts/bench_pipeline.py --partitions --json     # default vs auto vs every split
    python scripts/bench_pipeline.py --partitions --shape 8b --device cuda --partition-span 3
                                                             # the same, 8B shape, ranks on 1 GPU
    ppruntime bench ...                                       # the same

The driver starts each run as its own MPI job (`mpirun -n PP python this --worker`),
back to back in one invocation, one torch thread per rank. Per run it reports
output tokens/s, requests/s, TTFT and TPOT p50/p99, and per rank the busy fraction
(forward + sample time / measured window) and bubble fraction (1 - busy).

Throughput is counted in microbatches/s for the bound: a stage's time per
microbatch is (forward + sample seconds) / microbatches from that rank's RankReport
(same run), and bound_ratio = (microbatches/s) * (slowest stage's s/microbatch).
On a GPU (`--device-time`, the default there) a stage's time is its GPU time instead:
the host's forward spans only launch kernels and replay graphs. It comes from the
trace's device spans (CUDA events around each microbatch's forward and sampling), and
where ranks share one GPU, which time-slices between processes, the time their spans
overlap is split between them (ppruntime/stage/device_spans.py shared_device_seconds).
The spans are GPU time while the GPU is the bottleneck; a rank whose GPU waits for its
host between launches would count that wait too.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common

COMPUTE_SPANS = ("forward", "sample")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="bench-small")
    parser.add_argument("--model", default=None, help="a checkpoint directory instead of --preset")
    parser.add_argument(
        "--shape",
        default=None,
        help="write a random bf16 checkpoint of this scripts/bench_gpu.py shape (8b, 1b, "
        "small) into --workdir and use it instead of --preset",
    )
    parser.add_argument("--workdir", default=None, help="where --shape's checkpoint goes")
    parser.add_argument("--device", default=None, help="cpu or cuda (ranks may share a GPU)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument(
        "--activation-channel",
        default=None,
        help="default: auto (host when ranks share a GPU: NCCL refuses that)",
    )
    parser.add_argument("--kv-cache-memory-mb", type=int, default=256)
    parser.add_argument("--pp", type=int, default=2, help="pipeline size of a single run")
    parser.add_argument(
        "--compare",
        type=int,
        default=None,
        metavar="N",
        help="run PP=1 then PP=N back to back; report efficiency",
    )
    parser.add_argument(
        "--uneven",
        action="store_true",
        help="1:2 stage imbalance at PP=2, async and deterministic side by side",
    )
    parser.add_argument(
        "--imbalance",
        choices=("partition", "delay"),
        default="partition",
        help="how --uneven makes stage 1 twice as slow as stage 0",
    )
    parser.add_argument(
        "--layer-partition",
        default=None,
        help="layers per stage (single run; default for --uneven: 3,5)",
    )
    parser.add_argument(
        "--partitions",
        action="store_true",
        help="PP=--pp: the default partition, auto and every whole-layer partition side by "
        "side; then default vs auto with stage 1 slowed by --partition-delay-ms",
    )
    parser.add_argument("--partition-delay-ms", type=float, default=20.0)
    parser.add_argument(
        "--partition-span",
        type=int,
        default=None,
        metavar="K",
        help="--partitions: only the whole-layer splits within K layers per stage of the "
        "default one (default: every split)",
    )
    parser.add_argument(
        "--delayed-splits",
        action="store_true",
        help="--partitions: also run those splits with the delay (the best one reachable)",
    )
    parser.add_argument(
        "--partition-decode-fraction",
        type=float,
        default=None,
        help="for auto (default: this workload's share of decode microbatches)",
    )
    parser.add_argument(
        "--reprobe",
        action="store_true",
        help="auto runs: every rank times its pieces again right after the run (how far "
        "the load drifted from the start-up probe); on by default with --partitions",
    )
    parser.add_argument(
        "--deterministic", action="store_true", help="single run in deterministic mode"
    )
    parser.add_argument("--num-requests", type=int, default=64)
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument(
        "--max-num-tokens",
        type=int,
        default=None,
        help="token budget of a microbatch (default: max(1024, max-batch-size x input-len))",
    )
    parser.add_argument("--trace", default=None, help="write a Chrome trace of the (last) PP>1 run")
    parser.add_argument(
        "--device-time",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a stage's time per microbatch is its GPU time (the device spans of the trace, "
        "ranks sharing a GPU sharing it) rather than its host compute spans' time (default: "
        "on when the ranks compute on a GPU)",
    )
    parser.add_argument(
        "--json", action="store_true", help="print one JSON object as the last line"
    )


# ----------------------------------------------------------------------------------------
# worker: runs under mpirun, one rank per stage
# ----------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> None:
    common.one_torch_thread()
    import tempfile

    import numpy as np

    from ppruntime.api.llm import LLM
    from ppruntime.engine.sampling_params import SamplingParams

    trace = args.trace
    if args.device_time and trace is None:  # the device spans come with a trace
        trace = os.path.join(tempfile.gettempdir(), f"bench-pipeline-trace-{os.getpid()}.json")

    llm = LLM(
        model=args.model,
        preset=None if args.model else args.preset,
        dtype=args.dtype,
        device=args.device,
        activation_channel=args.activation_channel,
        kv_cache_memory_mb=args.kv_cache_memory_mb,
        pp_size=args.pp,
        layer_partition=args.layer_partition,
        partition_decode_fraction=args.partition_decode_fraction or 0.9,
        partition_decode_context=args.input_len + args.output_len // 2,
        deterministic=args.deterministic,
        max_batch_size=args.max_batch_size,
        max_model_len=args.input_len + args.output_len,
        max_num_tokens=args.max_num_tokens or max(1024, args.max_batch_size * args.input_len),
        trace=trace,
        exit_workers=not args.reprobe,
    )
    if not llm.is_driver:  # --reprobe: the pipeline has shut down
        _reprobe(llm)
        return
    rng = np.random.default_rng(0)
    prompts = [
        rng.integers(0, 256, size=args.input_len, dtype=np.int32) for _ in range(args.num_requests)
    ]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    start = time.time()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    end = time.time()
    auto = llm._engine.auto_partition
    measured_costs = getattr(llm._engine, "partition_costs", None) if auto is not None else None
    devices = [rank.gpu or (rank.host, "cpu", rank.rank) for rank in llm._engine.rank_devices]
    reports = llm.shutdown()
    after = _reprobe(llm) if args.reprobe else None  # every rank calls it
    if trace != args.trace and os.path.exists(trace):
        os.remove(trace)
    device_s = _device_seconds(reports, devices) if args.device_time else None
    window = end - start
    ttft = [o.metrics.ttft for o in outputs]
    tpot = [
        (o.metrics.finished_time - o.metrics.first_token_time) / max(len(o.token_ids) - 1, 1)
        for o in outputs
    ]
    out_tokens = sum(len(o.token_ids) for o in outputs)
    ranks = []
    for report in reports:
        compute = sum(report.busy_s.get(name, 0.0) for name in COMPUTE_SPANS)
        compute_cpu = sum(report.busy_cpu_s.get(name, 0.0) for name in COMPUTE_SPANS)
        if device_s is not None:  # GPU time: the host's spans only launch the work there
            compute = device_s[report.rank]
        ranks.append(
            {
                "rank": report.rank,
                "batches": report.batches,
                "forward_s": report.busy_s.get("forward", 0.0),
                "compute_s": compute,
                "compute_is_device_time": device_s is not None,
                "s_per_microbatch": compute / max(report.batches, 1),
                # the compute thread's CPU time: what other processes' load does not inflate
                "cpu_s_per_microbatch": compute_cpu / max(report.batches, 1),
                "forward_s_per_microbatch": report.busy_s.get("forward", 0.0)
                / max(report.batches, 1),
                "busy_fraction": min(compute / window, 1.0),
                "bubble_fraction": max(1.0 - compute / window, 0.0),
                "busy_s": report.busy_s,
            }
        )
    microbatches = reports[-1].batches
    slowest = max(rank["s_per_microbatch"] for rank in ranks)
    common.emit_worker_result(
        {
            "pp": args.pp,
            "deterministic": args.deterministic,
            "layer_partition": args.layer_partition,
            "window_s": window,
            "output_tokens": out_tokens,
            "output_tokens_per_s": out_tokens / window,
            "requests_per_s": len(outputs) / window,
            "microbatches": microbatches,
            "microbatches_per_s": microbatches / window,
            "slowest_stage_s_per_microbatch": slowest,
            "bound_ratio": (microbatches / window) * slowest,
            "ttft_p50_s": common.percentile(ttft, 50),
            "ttft_p99_s": common.percentile(ttft, 99),
            "tpot_p50_s": common.percentile(tpot, 50),
            "tpot_p99_s": common.percentile(tpot, 99),
            "ranks": ranks,
            "auto_partition": None if auto is None else list(auto.counts),
            "predicted_stage_s": None if auto is None else list(auto.stage_times),
            "reprobed_stage_s": after,
            "partition_costs": None
            if measured_costs is None
            else [entry.to_dict() for entry in measured_costs[0]],
        }
    )


def _device_seconds(reports, devices: list) -> dict[int, float] | None:
    """Each rank's GPU time in its microbatches (forward and sampling), from the trace's
    device spans; ranks that share a GPU share the time their spans overlap. None when
    a rank that computed has no span (then the host's spans are reported)."""
    from ppruntime.stage.device_spans import DEVICE_SPANS, shared_device_seconds

    spans = {
        report.rank: [(event[1], event[2]) for event in report.events if event[0] in DEVICE_SPANS]
        for report in reports
    }
    if any(report.batches and not spans[report.rank] for report in reports):
        return None
    return shared_device_seconds(spans, dict(enumerate(devices)))


def _reprobe(llm) -> list[float] | None:
    """Every rank times its pieces again right after the run, as at start-up: the
    stage times this predicts for the partition used (rank 0; None elsewhere) tell how
    far the machine's load drifted between the start-up probe and the run."""
    from mpi4py import MPI

    from ppruntime.engine.partition_costs import (
        measure_costs_for,
        measure_in_turns,
        predicted_stage_times,
        probe_key,
    )
    from ppruntime.model import load_config

    engine = llm._engine
    auto = engine.auto_partition
    costs = None
    if auto is not None:
        config = engine.config
        model_config = load_config(config.model)
        costs = measure_in_turns(  # ranks sharing a GPU one after the other, as at start-up
            MPI.COMM_WORLD,
            probe_key(engine.device, engine.info.host),
            lambda: measure_costs_for(config, model_config, engine.device, engine.info.rank)[0],
        )
    gathered = MPI.COMM_WORLD.gather(costs, root=0)
    if gathered is None or auto is None:
        return None
    return list(predicted_stage_times(tuple(auto.counts), gathered))


# ----------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------
def _run(
    args,
    pp: int,
    deterministic: bool = False,
    partition: str | None = None,
    env: dict | None = None,
    trace: str | None = None,
) -> dict:
    worker_args = [
        *(["--model", args.model] if args.model else ["--preset", args.preset]),
        *(["--device", args.device] if args.device else []),
        *(["--activation-channel", args.activation_channel] if args.activation_channel else []),
        "--dtype",
        args.dtype,
        "--kv-cache-memory-mb",
        str(args.kv_cache_memory_mb),
        "--pp",
        str(pp),
        "--num-requests",
        str(args.num_requests),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--max-batch-size",
        str(args.max_batch_size),
    ]
    if args.max_num_tokens:
        worker_args += ["--max-num-tokens", str(args.max_num_tokens)]
    if deterministic:
        worker_args.append("--deterministic")
    if partition:
        worker_args += ["--layer-partition", partition]
    if partition == "auto":
        worker_args += ["--partition-decode-fraction", str(_decode_fraction(args))]
        if args.partitions:
            worker_args.append("--reprobe")
    if trace:
        worker_args += ["--trace", trace]
    if _device_time(args):
        worker_args.append("--device-time")
    return common.run_mpi_worker(pp, os.path.abspath(__file__), worker_args, env=env)


def _device_time(args) -> bool:
    """Whether a stage's time is its GPU time (--device-time; default: on a GPU, where
    the host's forward spans only launch kernels and replay graphs)."""
    if args.device_time is not None:
        return args.device_time
    if args.device is not None:
        return args.device.startswith("cuda")
    import torch

    return torch.cuda.is_available()  # the ranks' default device


def _describe(label: str, run: dict) -> list[str]:
    lines = [
        f"{label}: {run['output_tokens_per_s']:.1f} out tok/s, {run['requests_per_s']:.2f} req/s, "
        f"{run['microbatches_per_s']:.2f} microbatches/s, window {run['window_s']:.2f} s",
        f"  TTFT p50/p99 {run['ttft_p50_s'] * 1e3:.1f}/{run['ttft_p99_s'] * 1e3:.1f} ms, "
        f"TPOT p50/p99 {run['tpot_p50_s'] * 1e3:.1f}/{run['tpot_p99_s'] * 1e3:.1f} ms",
    ]
    for rank in run["ranks"]:
        lines.append(
            f"  rank {rank['rank']}: {rank['batches']} microbatches, "
            f"{rank['s_per_microbatch'] * 1e3:.1f} ms compute/microbatch, "
            f"busy {rank['busy_fraction']:.3f}, bubble {rank['bubble_fraction']:.3f}"
        )
    return lines


def _headline(run: dict) -> dict:
    keys = (
        "output_tokens_per_s",
        "requests_per_s",
        "ttft_p50_s",
        "ttft_p99_s",
        "tpot_p50_s",
        "tpot_p99_s",
    )
    result = {key: run[key] for key in keys}
    result["busy_fraction"] = [rank["busy_fraction"] for rank in run["ranks"]]
    result["bubble_fraction"] = [rank["bubble_fraction"] for rank in run["ranks"]]
    return result


def _uneven_setup(args) -> tuple[str | None, dict | None, str]:
    if args.imbalance == "delay":
        # stage 1 sleeps as long as a balanced stage computes: 1:2 per microbatch
        delay = os.environ.get("BENCH_UNEVEN_DELAY_MS", "40")
        return None, {"PPRUNTIME_STAGE_DELAY_MS": f"1:{delay}"}, f"delay 1:{delay} ms"
    partition = args.layer_partition or "3,5"
    return partition, None, f"layer partition {partition}"


def _decode_fraction(args) -> float:
    """This workload's expected share of decode microbatches (for `auto`)."""
    if args.partition_decode_fraction is not None:
        return args.partition_decode_fraction
    prefill = -(-args.num_requests // args.max_batch_size)
    decode = args.num_requests * max(args.output_len - 1, 0) / args.max_batch_size
    return decode / (decode + prefill)


def _compositions(total: int, parts: int):
    """Every way to give `parts` stages at least one of `total` layers, in order."""
    if parts == 1:
        yield (total,)
        return
    for first in range(1, total - parts + 2):
        for rest in _compositions(total - first, parts - 1):
            yield (first, *rest)


def _slowest_cpu(run: dict) -> float:
    return max(rank["cpu_s_per_microbatch"] for rank in run["ranks"])


def _imbalance(run: dict) -> float:
    stage = [rank["s_per_microbatch"] for rank in run["ranks"]]
    return max(stage) / min(stage)


def _default_counts(model_config, pp: int) -> tuple[int, ...]:
    """The engine's default split (layer counts, embedding and LM head counted in)."""
    from ppruntime.model import partition_layers, stage_extra_costs

    first, last = stage_extra_costs(model_config)
    stages = partition_layers(
        model_config.num_hidden_layers, pp, first_stage_extra_cost=first, last_stage_extra_cost=last
    )
    return tuple(stage.num_layers for stage in stages)


def _splits(num_layers: int, pp: int, default: tuple[int, ...], span: int | None) -> list:
    """Every whole-layer split, or those within `span` layers per stage of the default."""
    return [
        counts
        for counts in _compositions(num_layers, pp)
        if span is None or max(abs(a - b) for a, b in zip(counts, default)) <= span
    ]


def _predicted_slowest(costs: list[dict], splits: list) -> dict[str, float]:
    """The cost model's slowest stage (s per microbatch) for each split."""
    from ppruntime.engine.partition_costs import predicted_stage_times
    from ppruntime.model.partition import RankCosts

    ranks = [RankCosts.from_dict(entry) for entry in costs]
    return {_name(counts): max(predicted_stage_times(counts, ranks)) for counts in splits}


def _fractional_best_s(costs: list[dict], num_layers: int) -> float | None:
    """PP=2: the slowest stage if layers could be split anywhere (both stages equal)."""
    if len(costs) != 2:
        return None
    first, last = costs
    fixed_0 = first["fixed_s"] + first["embed_s"]
    fixed_1 = last["fixed_s"] + last["head_s"]
    layers_0 = (fixed_1 + num_layers * last["layer_s"] - fixed_0) / (
        first["layer_s"] + last["layer_s"]
    )
    layers_0 = min(max(layers_0, 1.0), num_layers - 1.0)
    return max(
        fixed_0 + layers_0 * first["layer_s"], fixed_1 + (num_layers - layers_0) * last["layer_s"]
    )


def _name(counts) -> str:
    return ",".join(map(str, counts))


def _prepare_model(args) -> None:
    """--shape: write the random checkpoint once, for every job of this invocation."""
    if not args.shape:
        return
    import tempfile
    from pathlib import Path

    import torch
    from bench_gpu import SHAPES, write_checkpoint

    if args.shape not in SHAPES:
        raise SystemExit(f"unknown --shape {args.shape!r}; shapes: {', '.join(SHAPES)}")
    directory = Path(tempfile.mkdtemp(prefix="bench-pipeline-", dir=args.workdir))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    started = time.perf_counter()
    write_checkpoint(SHAPES[args.shape], directory / args.shape, device)
    args.model = str(directory / args.shape)
    args.checkpoint_write_s = time.perf_counter() - started
    if args.dtype == "auto":
        args.dtype = "bfloat16"


def _compare_partitions(args) -> tuple[list[str], dict]:
    from ppruntime.model import load_config

    started = time.perf_counter()
    pp = args.pp
    model_config = load_config(args.model or args.preset)
    num_layers = model_config.num_hidden_layers
    if args.max_num_tokens is None:
        # a prefill microbatch of this workload is max_batch_size prompts: let auto time that
        args.max_num_tokens = max(args.max_batch_size * args.input_len, args.max_batch_size)
    default_counts = _default_counts(model_config, pp)
    splits = _splits(num_layers, pp, default_counts, args.partition_span)
    default = _run(args, pp)
    auto = _run(args, pp, partition="auto")
    every = {_name(counts): _run(args, pp, partition=_name(counts)) for counts in splits}
    best_name, best = max(every.items(), key=lambda item: item[1]["output_tokens_per_s"])
    auto_name = _name(auto["auto_partition"])
    predicted = max(auto["predicted_stage_s"])
    measured = auto["slowest_stage_s_per_microbatch"]
    # the cost model (auto's costs) against every split's measured slowest stage
    predicted_by_split = _predicted_slowest(auto["partition_costs"], splits)
    model_over_measured = {
        name: predicted_by_split[name] / run["slowest_stage_s_per_microbatch"]
        for name, run in every.items()
    }
    model_over_measured_cpu = {
        name: predicted_by_split[name] / _slowest_cpu(run) for name, run in every.items()
    }
    env = {"PPRUNTIME_STAGE_DELAY_MS": f"1:{args.partition_delay_ms:g}"}
    slow_default = _run(args, pp, env=env)
    slow_auto = _run(args, pp, partition="auto", env=env)
    slow_every = {}
    if args.delayed_splits:
        slow_every = {_name(c): _run(args, pp, partition=_name(c), env=env) for c in splits}
    slow_costs = slow_auto["partition_costs"]
    slow_predicted = _predicted_slowest(slow_costs, list(_compositions(num_layers, pp)))
    slow_default_predicted = _predicted_slowest(slow_costs, [default_counts])[_name(default_counts)]
    slow_best_predicted = min(slow_predicted, key=slow_predicted.get)
    fractional = _fractional_best_s(slow_costs, num_layers)
    # on a GPU a stage's time is its GPU time (device spans); its thread's CPU time
    # there is the launching and waiting, no measure of the stage
    on_gpu = auto["ranks"][0]["compute_is_device_time"]
    clock = "device time" if on_gpu else "wall"
    if on_gpu:
        model_over_measured_cpu = {name: None for name in every}
    lines = [f"PP={pp}, {num_layers} layers: output tokens/s by partition"]
    for name, run in every.items():
        lines.append(
            f"  {name}: {run['output_tokens_per_s']:.1f}, imbalance {_imbalance(run):.3f}, "
            f"model/measured slowest stage {model_over_measured[name]:.3f} ({clock})"
            + ("" if on_gpu else f", {model_over_measured_cpu[name]:.3f} (CPU time)")
        )
    result = {
        "measured_stage_time": "gpu" if on_gpu else "host wall",
        "default_partition": _name(default_counts),
        "auto_partition": auto_name,
        "best_partition": best_name,
        "auto_over_best": auto["output_tokens_per_s"] / best["output_tokens_per_s"],
        "auto_over_default": auto["output_tokens_per_s"] / default["output_tokens_per_s"],
        "auto_predicted_over_measured_slowest": predicted / measured,
        "auto_predicted_stage_s": auto["predicted_stage_s"],
        "auto_measured_stage_s": [rank["s_per_microbatch"] for rank in auto["ranks"]],
        # the same probe right after the run: start-up and after bracket the load drift
        "auto_reprobed_stage_s": auto["reprobed_stage_s"],
        "auto_reprobed_over_measured_slowest": max(auto["reprobed_stage_s"]) / measured,
        "model_over_measured_slowest_by_partition": model_over_measured,
        # against the stages' CPU time per microbatch (the probe times CPU time on CPU)
        "auto_predicted_over_measured_slowest_cpu": None
        if on_gpu
        else predicted / _slowest_cpu(auto),
        "auto_measured_stage_cpu_s": [rank["cpu_s_per_microbatch"] for rank in auto["ranks"]],
        "model_over_measured_slowest_cpu_by_partition": model_over_measured_cpu,
        "imbalance_default": _imbalance(default),
        "imbalance_auto": _imbalance(auto),
        "throughput_default": default["output_tokens_per_s"],
        "throughput_auto": auto["output_tokens_per_s"],
        "throughput_by_partition": {n: r["output_tokens_per_s"] for n, r in every.items()},
        "auto_costs": auto["partition_costs"],
        "delayed_auto_partition": _name(slow_auto["auto_partition"]),
        "delayed_auto_over_default": slow_auto["output_tokens_per_s"]
        / slow_default["output_tokens_per_s"],
        "delayed_costs": slow_costs,
        "delayed_predicted_best_partition": slow_best_predicted,
        # throughput follows the slowest stage: what the cost model says is reachable
        "delayed_predicted_best_over_default": slow_default_predicted
        / slow_predicted[slow_best_predicted],
        "delayed_predicted_fractional_over_default": None
        if fractional is None
        else slow_default_predicted / fractional,
    }
    if slow_every:
        slow_best_name, slow_best = max(
            slow_every.items(), key=lambda item: item[1]["output_tokens_per_s"]
        )
        result.update(
            delayed_throughput_by_partition={
                n: r["output_tokens_per_s"] for n, r in slow_every.items()
            },
            delayed_best_partition=slow_best_name,
            delayed_best_over_default=slow_best["output_tokens_per_s"]
            / slow_default["output_tokens_per_s"],
            delayed_auto_over_best=slow_auto["output_tokens_per_s"]
            / slow_best["output_tokens_per_s"],
        )
    if getattr(args, "checkpoint_write_s", None) is not None:
        result["checkpoint_write_s"] = args.checkpoint_write_s
    result["comparison_wall_s"] = time.perf_counter() - started
    lines += [
        f"default {result['default_partition']}: {default['output_tokens_per_s']:.1f} tok/s, "
        f"imbalance {result['imbalance_default']:.3f}",
        f"auto {auto_name}: {auto['output_tokens_per_s']:.1f} tok/s, imbalance "
        f"{result['imbalance_auto']:.3f}; auto / best ({best_name}) = "
        f"{result['auto_over_best']:.3f}; predicted / measured slowest stage = "
        f"{result['auto_predicted_over_measured_slowest']:.3f} ({clock}; probed again after "
        f"the run: {result['auto_reprobed_over_measured_slowest']:.3f}"
        + (
            ")"
            if on_gpu
            else f"; against the stages' CPU time: "
            f"{result['auto_predicted_over_measured_slowest_cpu']:.3f})"
        ),
        f"stage 1 delayed {args.partition_delay_ms:g} ms: auto {result['delayed_auto_partition']} "
        f"/ default throughput = {result['delayed_auto_over_default']:.3f}; the cost model's "
        f"best split {slow_best_predicted} would give "
        f"{result['delayed_predicted_best_over_default']:.3f}x",
    ]
    if slow_every:
        lines.append(
            f"  delayed, measured: best {result['delayed_best_partition']} "
            f"{result['delayed_best_over_default']:.3f}x the default, auto / best "
            f"{result['delayed_auto_over_best']:.3f}"
        )
    return lines, result


def drive(args: argparse.Namespace) -> int:
    if int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        print(
            "run the benchmark driver without mpirun: it starts its own MPI jobs", file=sys.stderr
        )
        return 2
    _prepare_model(args)
    try:
        return _drive(args)
    finally:
        if args.shape and args.model:  # the checkpoint written for this invocation
            import shutil

            shutil.rmtree(os.path.dirname(args.model), ignore_errors=True)


def _drive(args: argparse.Namespace) -> int:
    result: dict = {
        "preset": args.preset,
        "model": args.model,
        "num_requests": args.num_requests,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "max_batch_size": args.max_batch_size,
    }
    lines: list[str] = []
    if args.compare:
        n = args.compare
        base = _run(args, 1)
        piped = _run(args, n, trace=args.trace)
        efficiency = piped["output_tokens_per_s"] / (n * base["output_tokens_per_s"])
        lines += _describe("PP=1", base) + _describe(f"PP={n}", piped)
        lines.append(f"efficiency = tput(PP={n}) / ({n} * tput(PP=1)) = {efficiency:.3f}")
        result.update(efficiency=efficiency, pp1=_headline(base), **{f"pp{n}": _headline(piped)})
        result.update(_headline(piped))
    if args.uneven:
        partition, env, how = _uneven_setup(args)
        sync = _run(args, 2, deterministic=True, partition=partition, env=env)
        asyn = _run(args, 2, deterministic=False, partition=partition, env=env, trace=args.trace)
        lines.append(
            f"uneven PP=2 ({how}); bound_ratio = microbatches/s * slowest stage s/microbatch"
        )
        lines += _describe("  async", asyn) + _describe("  deterministic", sync)
        speedup = asyn["output_tokens_per_s"] / sync["output_tokens_per_s"]
        lines.append(
            f"bound_ratio_async = {asyn['bound_ratio']:.3f}, "
            f"bound_ratio_sync = {sync['bound_ratio']:.3f}, "
            f"async/deterministic throughput = {speedup:.3f}"
        )
        result.update(
            imbalance=how,
            bound_ratio_async=asyn["bound_ratio"],
            bound_ratio_sync=sync["bound_ratio"],
            async_over_sync_throughput=asyn["output_tokens_per_s"] / sync["output_tokens_per_s"],
            stage_s_per_microbatch_async=[r["s_per_microbatch"] for r in asyn["ranks"]],
            stage_s_per_microbatch_sync=[r["s_per_microbatch"] for r in sync["ranks"]],
            uneven_async=_headline(asyn),
            uneven_sync=_headline(sync),
        )
    if args.partitions:
        partition_lines, partition_result = _compare_partitions(args)
        lines += partition_lines
        result.update(partition_result)
    if not args.compare and not args.uneven and not args.partitions:
        run = _run(
            args,
            args.pp,
            deterministic=args.deterministic,
            partition=args.layer_partition,
            trace=args.trace,
        )
        lines += _describe(f"PP={args.pp}", run)
        result.update(_headline(run), ranks=run["ranks"], bound_ratio=run["bound_ratio"])
    if args.trace:
        lines.append(f"trace written to {args.trace}")
    common.emit(lines, result, args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return common.run_benchmark(parser, argv, worker, drive)


if __name__ == "__main__":
    sys.exit(main())

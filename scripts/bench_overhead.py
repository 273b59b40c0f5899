#!/usr/bin/env python
"""Loop overhead benchmark (issue 6): null-compute stages at PP=2, batch 1 to 512.

    python scripts/bench_overhead.py --json

The `null` preset keeps the whole loop (scheduler, step inputs, transport, sampling,
relay, handling) but skips the model math. For each batch size B one MPI job of two
ranks (all batch sizes in one job, back to back) builds an engine with
max_batch_size=B, runs 4*B requests (enough for every async microbatch slot) of
`--output-len` tokens, and reports:

  host_us_per_iteration per rank: the rank's own host work per iteration (its
                instrumented time minus what it spent waiting: receive-wait,
                send-wait, relay-wait, idle);
  us_per_step:  wall microseconds per pipeline iteration (the generate window
                divided by rank 0's iterations), which also holds the hops between
                ranks (latency, not host work).
Headline keys: us_per_step_b256 = the busiest rank's host_us_per_iteration at batch
256, and growth_512_over_32 = the same at 512 over at 32.

    python scripts/bench_overhead.py --pp1-async --json [--profile 30]

`--pp1-async` measures the host's own work per decode step on the path a GPU runs at
PP=1: one rank, async scheduling on (step k+1 scheduled and launched before step k
lands), null-compute stage, batch 64 (`--batches`). Everything on the CPU is host work
(the "device" waits return at once), so host_us_per_step is the generate window over
the iterations (prefill included, 1 of `--output-len` steps), the best of `--repeats`
windows; host_cpu_us_per_step is the same with the executor thread's CPU time (steadier
than the wall clock on a shared machine). It also
counts the torch operator calls per decode step (torch_ops_per_step, a dispatch mode
counting aten calls in one more window): on a GPU each costs 5-15 us of dispatch and
launch, so it is the CPU-visible part of what the GPU path costs the host. `--profile
N` adds the N functions with the largest cumulative time per step (cProfile, one more
window; profiled times are inflated, read them as shares).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common

WAIT_SPANS = ("receive-wait", "send-wait", "relay-wait", "idle")
DEFAULT_BATCHES = "1,2,4,8,16,32,64,128,256,512"
PP1_ASYNC_BATCHES = "64"  # --pp1-async: the GPU measurement's batch


def _engine(args, batch: int, **options):
    """An engine for `batch` sequences of the workload's lengths (workers stay up)."""
    from ppruntime.api.llm import LLM

    return LLM(
        max_batch_size=batch,
        max_num_tokens=max(batch * args.input_len, 256),
        max_model_len=args.input_len + args.output_len + 16,
        exit_workers=False,
        **options,
    )


def worker(args) -> None:
    common.one_torch_thread()
    import numpy as np

    from ppruntime.engine.sampling_params import SamplingParams

    results = []
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    for batch in [int(b) for b in args.batches.split(",")]:
        llm = _engine(args, batch, preset="null", pp_size=2)
        if not llm.is_driver:
            continue  # the constructor served until rank 0 shut the engine down
        prompts = [
            rng.integers(0, 256, size=args.input_len, dtype=np.int32)
            for _ in range(args.requests_per_slot * batch)
        ]
        llm.generate(prompts[: 2 * batch], params, use_tqdm=False)  # warm-up, then reset
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        window = time.perf_counter() - start
        reports = llm.shutdown()
        # the warm-up ran the same loop: the window covers the second generate only,
        # so count the iterations of the second generate from the totals
        iterations = reports[0].iterations * (len(prompts) / (len(prompts) + 2 * batch))
        ranks = []
        for report in reports:
            waits = sum(report.busy_s.get(name, 0.0) for name in WAIT_SPANS)
            ranks.append(
                {
                    "rank": report.rank,
                    "iterations": report.iterations,
                    "busy_s": report.busy_s,
                    "waits_s": waits,
                }
            )
        results.append(
            {"batch": batch, "window_s": window, "iterations": iterations, "ranks": ranks}
        )
    if results:
        common.emit_worker_result({"runs": results})


def pp1_async_worker(args) -> None:
    """One rank, async scheduling: host us per decode step, torch ops per step, profile."""
    common.one_torch_thread()
    import cProfile
    import pstats

    import numpy as np

    from ppruntime.engine.sampling_params import SamplingParams

    results = []
    rng = np.random.default_rng(0)
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    for batch in [int(b) for b in args.batches.split(",")]:
        llm = _engine(args, batch, preset=args.preset, pp_size=1, async_scheduling=True)
        executor = llm._executor
        prompts = [rng.integers(0, 256, size=args.input_len, dtype=np.int32) for _ in range(batch)]

        def window(prompts=prompts, llm=llm, executor=executor) -> tuple[float, float, int]:
            before = executor.stats.iterations
            start, start_cpu = time.perf_counter(), time.thread_time()
            llm.generate(prompts, params, use_tqdm=False)
            wall, cpu = time.perf_counter() - start, time.thread_time() - start_cpu
            return wall, cpu, executor.stats.iterations - before

        window()  # warm-up
        windows = [window() for _ in range(args.repeats)]
        best = min(wall / iterations for wall, _, iterations in windows)
        best_cpu = min(cpu / iterations for _, cpu, iterations in windows)
        counter = _TorchOpCounter()
        with counter:
            _, _, iterations = window()
        entry = {
            "batch": batch,
            "host_us_per_step": best * 1e6,
            "host_cpu_us_per_step": best_cpu * 1e6,
            "torch_ops_per_step": counter.total / iterations,
            "torch_ops": {name: count / iterations for name, count in counter.most_common(12)},
        }
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            _, _, iterations = window()
            profiler.disable()
            stats = pstats.Stats(profiler)
            rows = []
            for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items():
                where = f"{os.path.basename(path)}:{line}({name})"
                rows.append((cumulative, own, calls, where))
            rows.sort(reverse=True)
            entry["profile_us_per_step"] = [
                {
                    "function": where,
                    "cumulative": cumulative / iterations * 1e6,
                    "own": own / iterations * 1e6,
                    "calls": calls / iterations,
                }
                for cumulative, own, calls, where in rows[: args.profile]
            ]
        llm.shutdown()
        results.append(entry)
    common.emit_worker_result({"runs": results})


class _TorchOpCounter:
    """Counts aten operator calls while active (a TorchDispatchMode)."""

    def __init__(self) -> None:
        from collections import Counter

        from torch.utils._python_dispatch import TorchDispatchMode

        counts = self.counts = Counter()

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                counts[str(func.overloadpacket.__name__)] += 1
                return func(*args, **(kwargs or {}))

        self._mode = Mode()

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def most_common(self, n: int):
        return self.counts.most_common(n)

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc_info):
        return self._mode.__exit__(*exc_info)


def drive_pp1_async(args) -> int:
    if args.batches == DEFAULT_BATCHES:
        args.batches = PP1_ASYNC_BATCHES
    worker_args = ["--pp1-async", "--batches", args.batches, "--preset", args.preset]
    worker_args += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    worker_args += ["--repeats", str(args.repeats), "--profile", str(args.profile)]
    run = common.run_mpi_worker(1, os.path.abspath(__file__), worker_args)
    lines = ["PP=1, async scheduling:  batch   host us/step (wall, thread CPU)   torch ops/step"]
    for entry in run["runs"]:
        lines.append(
            f"{entry['batch']:30d} {entry['host_us_per_step']:14.1f} "
            f"{entry['host_cpu_us_per_step']:10.1f} "
            f"{entry['torch_ops_per_step']:15.1f}"
        )
        for row in entry.get("profile_us_per_step", []):
            lines.append(
                f"    {row['cumulative']:8.1f} us cum {row['own']:8.1f} own "
                f"{row['calls']:5.1f} calls  {row['function']}"
            )
    result = {"mode": "pp1-async", "batches": run["runs"]}
    first = run["runs"][0]
    result["host_us_per_step"] = first["host_us_per_step"]
    result["host_cpu_us_per_step"] = first["host_cpu_us_per_step"]
    result["torch_ops_per_step"] = first["torch_ops_per_step"]
    common.emit(lines, result, args.json)
    return 0


def drive(args) -> int:
    if args.pp1_async:
        return drive_pp1_async(args)
    run = common.run_mpi_worker(
        2,
        os.path.abspath(__file__),
        [
            "--batches",
            args.batches,
            "--input-len",
            str(args.input_len),
            "--output-len",
            str(args.output_len),
            "--requests-per-slot",
            str(args.requests_per_slot),
        ],
    )
    table = []
    lines = ["batch   us/step   host us/iteration (rank 0, rank 1)"]
    for entry in run["runs"]:
        us_per_step = entry["window_s"] / entry["iterations"] * 1e6
        host = []
        for rank in entry["ranks"]:
            total = sum(rank["busy_s"].values())
            # time not spent waiting, per iteration (the whole engine life)
            own = total - rank["waits_s"]
            host.append(own / max(rank["iterations"], 1) * 1e6)
        table.append(
            {"batch": entry["batch"], "us_per_step": us_per_step, "host_us_per_iteration": host}
        )
        lines.append(
            f"{entry['batch']:5d} {us_per_step:9.1f}   " + ", ".join(f"{h:.1f}" for h in host)
        )
    # the headline is the loop's own host time: per rank, per iteration, the busiest rank
    by_batch = {row["batch"]: max(row["host_us_per_iteration"]) for row in table}
    result = {"batches": table}
    if 256 in by_batch:
        result["us_per_step_b256"] = by_batch[256]
    if 512 in by_batch and 32 in by_batch:
        result["growth_512_over_32"] = by_batch[512] / by_batch[32]
    lines.append(
        f"us_per_step_b256 = {result.get('us_per_step_b256', float('nan')):.1f}, "
        f"growth_512_over_32 = {result.get('growth_512_over_32', float('nan')):.2f}"
    )
    common.emit(lines, result, args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default=DEFAULT_BATCHES)
    parser.add_argument("--input-len", type=int, default=8)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument(
        "--requests-per-slot",
        type=int,
        default=4,
        help="requests = this * batch (4 fills the async slots)",
    )
    parser.add_argument(
        "--pp1-async",
        action="store_true",
        help="one rank, async scheduling: host us and torch ops per decode step",
    )
    parser.add_argument("--preset", default="null", help="--pp1-async: the preset served")
    parser.add_argument("--repeats", type=int, default=3, help="--pp1-async: timed windows")
    parser.add_argument(
        "--profile", type=int, default=0, help="--pp1-async: top N functions per step"
    )
    return common.run_benchmark(
        parser, argv, lambda a: (pp1_async_worker if a.pp1_async else worker)(a), drive
    )


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""The engine's fixed cost per step on a small model: tiny preset, PP=2, offline generate.

    python scripts/bench_step_cost.py --json [--baseline DIR] [--profile 25]

For each batch B (`--batches`, default 32,64) one MPI job of two ranks builds an engine
with max_batch_size=B and runs 2*B requests of 32 + 64 tokens (greedy, `ignore_eos`):
both microbatches of the pipeline hold B sequences (the scheduler caps a microbatch at
ceil(unfinished / 2)), so B is the batch per microbatch. After a warm-up generate,
`--repeats` generate windows are timed. Reported per batch:

  cpu_us_per_iteration per rank: the rank process's CPU time (every thread: the relay's
                too) from the start of serving to shutdown, over its iterations: what
                a step costs a rank, the model math included (steadier than the wall
                clock on a shared machine);
  host_us_per_iteration per rank: the same from the wall clock: the rank's instrumented
                time minus receive-wait, send-wait, relay-wait and idle;
  us_per_step:  the best window's wall time over rank 0's iterations in it;
  tokens_per_s: the best window's output tokens per second.

`--baseline DIR` runs the same jobs on a second source tree (DIR holds a `ppruntime`
package: `git archive COMMIT ppruntime | tar -x -C DIR`) alternately with this one,
batch by batch, `--rounds` times, and prints this tree's figures over the baseline's
beside each other (the machine is shared: only ratios measured together mean
anything). Headline: `cpu_ratio_b32`, `cpu_ratio_b64` = the busiest rank's CPU us per
iteration, this tree over the baseline (the median of the rounds' pairs), and
`this_cpu_b32_over_b64` (how much of a full step's cost a half-full one keeps).

`--profile N` runs each rank under cProfile (one more job per batch, this tree only)
and prints the N functions with the most own time per iteration on each rank
(profiled times are inflated: read them as shares).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common

WAIT_SPANS = ("receive-wait", "send-wait", "relay-wait", "idle")


def worker(args) -> None:
    common.one_torch_thread()
    import numpy as np
    from mpi4py import MPI

    import ppruntime
    from ppruntime.api.llm import LLM
    from ppruntime.engine.sampling_params import SamplingParams

    profiler = _start_profile(args)
    serving_cpu_s = _time_serving()
    batch = args.batch
    llm = LLM(
        preset=args.preset,
        pp_size=2,
        max_batch_size=batch,
        max_num_tokens=max(batch * args.input_len, 256),
        max_model_len=args.input_len + args.output_len + 16,
        exit_workers=False,
    )
    if not llm.is_driver:  # the constructor served until rank 0 shut the engine down
        _save_profile(args, profiler)
        MPI.COMM_WORLD.gather(serving_cpu_s[0], root=0)
        return
    cpu_start = time.process_time()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 256, size=args.input_len, dtype=np.int32) for _ in range(2 * batch)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    llm.generate(prompts, params, use_tqdm=False)  # warm-up
    executor = llm._executor
    windows = []
    for _ in range(args.repeats):
        before = executor.stats.iterations
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=False)
        window = time.perf_counter() - start
        tokens = sum(len(output.token_ids) for output in outputs)
        windows.append((window, executor.stats.iterations - before, tokens))
    reports = llm.shutdown()
    cpu_s = MPI.COMM_WORLD.gather(time.process_time() - cpu_start, root=0)
    _save_profile(args, profiler)
    ranks = []
    for report, cpu in zip(reports, cpu_s):
        waits = sum(report.busy_s.get(name, 0.0) for name in WAIT_SPANS)
        own = sum(report.busy_s.values()) - waits
        ranks.append(
            {
                "rank": report.rank,
                "iterations": report.iterations,
                "host_us_per_iteration": own / max(report.iterations, 1) * 1e6,
                "cpu_us_per_iteration": cpu / max(report.iterations, 1) * 1e6,
                "busy_s": report.busy_s,
                "busy_cpu_s": report.busy_cpu_s,
            }
        )
    best = min(windows)
    common.emit_worker_result(
        {
            "batch": batch,
            "package": os.path.dirname(ppruntime.__file__),
            "us_per_step": best[0] / best[1] * 1e6,
            "tokens_per_s": best[2] / best[0],
            "ranks": ranks,
        }
    )


def _time_serving() -> list[float]:
    """Ranks > 0 serve inside LLM(...): time the process's CPU (every thread: the relay's
    too) from the start of serving to its end, as rank 0 does from after LLM(...)."""
    from ppruntime.engine.engine import PipelineEngine

    spent = [0.0]
    serve = PipelineEngine.serve

    def timed_serve(self) -> None:
        start = time.process_time()
        try:
            serve(self)
        finally:
            spent[0] = time.process_time() - start

    PipelineEngine.serve = timed_serve
    return spent


def _start_profile(args):
    if not args.profile_dir:
        return None
    import cProfile

    profiler = cProfile.Profile()
    profiler.enable()
    return profiler


def _save_profile(args, profiler) -> None:
    if profiler is None:
        return
    from mpi4py import MPI

    profiler.disable()
    profiler.dump_stats(os.path.join(args.profile_dir, f"rank{MPI.COMM_WORLD.Get_rank()}.prof"))


def _run(args, batch: int, tree: str | None = None, profile_dir: str | None = None) -> dict:
    worker_args = ["--batch", str(batch), "--preset", args.preset]
    worker_args += ["--input-len", str(args.input_len), "--output-len", str(args.output_len)]
    worker_args += ["--repeats", str(args.repeats)]
    if profile_dir:
        worker_args += ["--profile-dir", profile_dir]
    env = {"PYTHONPATH": os.path.abspath(tree)} if tree else None
    return common.run_mpi_worker(2, os.path.abspath(__file__), worker_args, env=env)


def _busiest(run: dict, key: str) -> float:
    return max(rank[key] for rank in run["ranks"])


METRICS = ("cpu_us_per_iteration", "host_us_per_iteration", "us_per_step", "tokens_per_s")


def _metric(run: dict, name: str) -> float:
    return _busiest(run, name) if name.endswith("per_iteration") else run[name]


def _profile(args, batch: int) -> list[list[dict]]:
    """Per rank, the `--profile` functions with the most own time, per iteration."""
    import pstats

    profiles = []
    with tempfile.TemporaryDirectory() as directory:
        run = _run(args, batch, profile_dir=directory)
        for rank in run["ranks"]:
            iterations = max(rank["iterations"], 1)
            stats = pstats.Stats(os.path.join(directory, f"rank{rank['rank']}.prof"))
            rows = sorted(
                (
                    (own, cumulative, calls, f"{os.path.basename(path)}:{line}({name})")
                    for (path, line, name), (_, calls, own, cumulative, _) in stats.stats.items()
                ),
                reverse=True,
            )
            profiles.append(
                [
                    {
                        "function": where,
                        "own_us": own / iterations * 1e6,
                        "cumulative_us": cumulative / iterations * 1e6,
                        "calls": calls / iterations,
                    }
                    for own, cumulative, calls, where in rows[: args.profile]
                ]
            )
    return profiles


def drive(args) -> int:
    batches = [int(b) for b in args.batches.split(",")]
    trees = [("this", None)] + ([("baseline", args.baseline)] if args.baseline else [])
    runs: dict[tuple[str, int], list[dict]] = {}
    for round_index in range(args.rounds):
        for batch in batches:
            # alternate which tree goes first, so neither always runs right after the other
            order = trees if round_index % 2 == 0 else trees[::-1]
            for name, tree in order:
                runs.setdefault((name, batch), []).append(_run(args, batch, tree))
    lines = [
        "batch  tree       CPU us/iteration   host us/iteration   us/step   tokens/s",
        "                  (rank 0, rank 1)   (rank 0, rank 1)",
    ]
    result: dict = {"batches": []}
    for batch in batches:
        entry: dict = {"batch": batch}
        for name, _ in trees:
            for run in runs[(name, batch)]:
                cpu = ", ".join(f"{r['cpu_us_per_iteration']:.0f}" for r in run["ranks"])
                host = ", ".join(f"{r['host_us_per_iteration']:.0f}" for r in run["ranks"])
                lines.append(
                    f"{batch:5d}  {name:9s}  {cpu:17s}  {host:18s}  {run['us_per_step']:7.0f}  "
                    f"{run['tokens_per_s']:9.0f}"
                )
            entry[name] = {
                metric: statistics.median(_metric(r, metric) for r in runs[(name, batch)])
                for metric in METRICS
            }
            first = runs[(name, batch)][0]
            entry[name]["package"] = first["package"]
            # the first run's spans, per rank: where an iteration's wall time goes
            entry[name]["spans_us_per_iteration"] = [
                {
                    span: seconds / max(rank["iterations"], 1) * 1e6
                    for span, seconds in sorted(rank["busy_s"].items())
                }
                for rank in first["ranks"]
            ]
            # ...and the CPU time of its compute spans (forward, sample)
            entry[name]["cpu_spans_us_per_iteration"] = [
                {
                    span: seconds / max(rank["iterations"], 1) * 1e6
                    for span, seconds in sorted(rank["busy_cpu_s"].items())
                }
                for rank in first["ranks"]
            ]
        if args.baseline:
            pairs = list(zip(runs[("this", batch)], runs[("baseline", batch)]))
            ratios = {
                metric: statistics.median(_metric(a, metric) / _metric(b, metric) for a, b in pairs)
                for metric in METRICS
            }
            entry["this_over_baseline"] = ratios
            result[f"cpu_ratio_b{batch}"] = ratios["cpu_us_per_iteration"]
            result[f"tokens_ratio_b{batch}"] = ratios["tokens_per_s"]
            lines.append(
                f"       this / baseline (medians of the rounds' pairs): CPU "
                f"{ratios['cpu_us_per_iteration']:.3f}, host {ratios['host_us_per_iteration']:.3f}"
                f", us/step {ratios['us_per_step']:.3f}, tokens/s {ratios['tokens_per_s']:.3f}"
            )
        result["batches"].append(entry)
    for name, _ in trees:
        cpu = {entry["batch"]: entry[name]["cpu_us_per_iteration"] for entry in result["batches"]}
        if 32 in cpu and 64 in cpu:
            result[f"{name}_cpu_b32_over_b64"] = cpu[32] / cpu[64]
            lines.append(f"{name}: CPU us/iteration at 32 over at 64 = {cpu[32] / cpu[64]:.3f}")
    for batch in batches if args.profile else []:
        profiles = _profile(args, batch)
        result.setdefault("profile_us_per_iteration", {})[str(batch)] = profiles
        for rank, rows in enumerate(profiles):
            lines.append(f"batch {batch}, rank {rank}: us per iteration (profiled)")
            lines += [
                f"    {row['own_us']:8.1f} own {row['cumulative_us']:8.1f} cum "
                f"{row['calls']:6.1f} calls  {row['function']}"
                for row in rows
            ]
    common.emit(lines, result, args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="32,64", help="sequences per microbatch")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed generate windows a job")
    parser.add_argument("--rounds", type=int, default=1, help="jobs per batch and tree")
    parser.add_argument("--baseline", help="a second source tree to compare with")
    parser.add_argument("--profile", type=int, default=0, help="top N functions per rank")
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)  # worker
    parser.add_argument("--profile-dir", help=argparse.SUPPRESS)  # worker
    return common.run_benchmark(parser, argv, worker, drive)


if __name__ == "__main__":
    sys.exit(main())

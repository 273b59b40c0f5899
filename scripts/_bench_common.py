"""Helpers shared by the benchmark scripts (scripts/bench_*.py).

Each benchmark is a driver that starts its own MPI jobs as subprocesses
(`mpirun -n N python <script> --worker ...`), one after the other, so the runs it
compares are made back to back in the same invocation (the machine is noisy: every
headline number is a ratio of such runs). A worker prints its result as one line
`BENCH_RESULT <json>` on rank 0; the driver parses it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ppruntime.comm.mpirun import find_mpirun, job_free_environment, mpirun_command

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "BENCH_RESULT "


def mpi_command(n: int, args: Sequence[str]) -> list[str]:
    # --bind-to none: a rank's relay thread must not be pinned to its compute core
    return mpirun_command(find_mpirun(REPO_ROOT), n, args, open_mpi_flags=("--bind-to", "none"))


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = job_free_environment()
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("MKL_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    if extra:
        env.update(extra)
    return env


def run_mpi_worker(
    n: int,
    script: str,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout_s: float = 600.0,
    python: str | None = None,
) -> dict:
    """Run `script --worker args` under `mpirun -n n`; return rank 0's result dict.

    python: the ranks' interpreter (default: this one)."""
    command = mpi_command(n, [python or sys.executable, script, "--worker", *args])
    started = time.perf_counter()
    proc = subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=worker_env(env),
        start_new_session=True,
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        time.sleep(2.0)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RuntimeError(
            f"worker timed out after {timeout_s}s: {' '.join(command)}\n{output[-4000:]}"
        ) from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"worker failed (rc={proc.returncode}): {' '.join(command)}\n{output[-4000:]}"
        )
    for line in reversed(output.splitlines()):
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX) :])
            result.setdefault("wall_s", time.perf_counter() - started)
            return result
    raise RuntimeError(f"worker printed no result: {' '.join(command)}\n{output[-4000:]}")


def emit_worker_result(result: dict) -> None:
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def one_torch_thread() -> None:
    import torch

    torch.set_num_threads(1)
    with contextlib.suppress(RuntimeError):
        torch.set_num_interop_threads(1)


def percentile(values: Sequence[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100.0
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def rounded(value, digits: int = 4):
    if isinstance(value, float):
        return round(value, digits)
    if isinstance(value, dict):
        return {k: rounded(v, digits) for k, v in value.items()}
    if isinstance(value, list):
        return [rounded(v, digits) for v in value]
    return value


def emit(summary_lines: Sequence[str], result: dict, as_json: bool) -> None:
    """Human-readable lines, then (with --json) one JSON object as the last line."""
    for line in summary_lines:
        print(line)
    if as_json:
        print(json.dumps(rounded(result)), flush=True)


def run_benchmark(parser, argv, worker, drive) -> int:
    """Parse `argv`; `--worker` runs this rank's part inside the MPI job, else drive it."""
    if not any(action.dest == "json" for action in parser._actions):
        parser.add_argument("--json", action="store_true", help="print one JSON object last")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    return drive(args)

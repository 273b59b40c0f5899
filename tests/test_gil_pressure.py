"""GIL pressure: async PP=2 with a stage busy in pure Python between steps never deadlocks.

TensorRT-LLM went back to a synchronous relay because its relay thread starved of the
GIL while the executor thread ran long Python work. Here 20 engines run one after the
other in ONE MPI job (tests/failure_scripts/gil_pressure.py), each with rank 1, rank 0
or both busy-looping in pure Python (PPRUNTIME_PYTHON_WORK_MS) before every forward;
each run has its own timeout guard, the job a hard timeout. Every run must finish and
give the tokens of a run without the pressure, and the knob must really have slowed
the rank it names (else this test proves nothing).
"""

from __future__ import annotations

import json
import sys

import pytest
from launching import REPO_ROOT, describe, run_mpi

SCRIPT = str(REPO_ROOT / "tests" / "failure_scripts" / "gil_pressure.py")
RUNS = 10
JOB_TIMEOUT_S = 150


@pytest.mark.timeout(JOB_TIMEOUT_S + 30)
def test_ten_async_runs_under_gil_pressure_without_deadlock() -> None:
    args = [sys.executable, SCRIPT, "--runs", str(RUNS), "--work-ms", "30", "--run-timeout", "40"]
    result = run_mpi(2, args, timeout=JOB_TIMEOUT_S, env={"PYTHONPATH": str(REPO_ROOT)})
    assert result.returncode == 0, describe(result)
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, describe(result)
    summary = json.loads(lines[0].removeprefix("RESULT "))
    assert summary["runs"] == RUNS and len(summary["seconds"]) == RUNS, summary
    assert summary["mismatches"] == [], f"tokens differ from the unpressured run: {summary}"
    assert_knob_slowed_its_ranks(summary)


def assert_knob_slowed_its_ranks(summary: dict) -> None:
    """Each forward of a named rank busy-loops work_ms before computing, so its forward
    time is at least forwards x work_ms (a lower bound by construction, whatever the
    load); a rank the knob does not name spends far less per forward."""
    work_s = summary["work_ms"] / 1000
    assert len(summary["knobs"]) == len(summary["forwards"]) == RUNS, summary
    for run, (knob, forwards) in enumerate(zip(summary["knobs"], summary["forwards"])):
        targets = {int(item.split(":")[0]) for item in knob.split(",")}
        per_forward = [busy / max(count, 1) for busy, count in forwards]
        what = f"run {run} ({knob}): seconds per forward by rank {per_forward}"
        for rank, (busy, count) in enumerate(forwards):
            assert count > 0, what
            if rank in targets:
                assert busy >= 0.9 * count * work_s, what
        others = [per_forward[rank] for rank in range(len(forwards)) if rank not in targets]
        for other in others:
            assert min(per_forward[rank] for rank in targets) >= 2 * other, what

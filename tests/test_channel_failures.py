"""The failures of tests/test_failures.py with the gloo activation channel.

While a peer waits in gloo (not in MPI), a killed rank must still end the job within
30 s, an exception in a forward must still abort naming the rank, and a stalled rank
must still be named by the watchdog (the channel's waits poll and stay visible).
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import pytest
from launching import ppruntime_cmd
from test_failures import (
    DEAD_RANK_LIMIT_S,
    FAULT_LIMIT_S,
    LONG_GENERATE,
    SIGTERM_LIMIT_S,
    START_TIMEOUT_S,
    WATCHDOG_SLACK_S,
    WATCHDOG_TIMEOUT_S,
    Job,
    _alive,
    _rank_pids,
    jobs,  # noqa: F401  (fixture)
)

pytestmark = pytest.mark.timeout(240)
GLOO = {"PPRUNTIME_ACTIVATION_CHANNEL": "gloo"}


def _long_gloo_generation(n: int, tmp_path: Path, started: list[Job]) -> Job:
    env = {**GLOO, "PPRUNTIME_STAGE_DELAY_MS": "0:5", "PPRUNTIME_LOG_DIR": str(tmp_path / "logs")}
    job = Job(n, [sys.executable, LONG_GENERATE, str(tmp_path)], env=env)
    started.append(job)
    job.wait_for(lambda: "GENERATING" in job.output, START_TIMEOUT_S, "generation")
    assert "activation channel: gloo" in (tmp_path / "logs" / "rank-0.log").read_text()
    return job


def test_killed_middle_rank_ends_the_gloo_job(tmp_path: Path, jobs) -> None:  # noqa: F811
    n, victim = 3, 1
    job = _long_gloo_generation(n, tmp_path, jobs)
    pids = _rank_pids(tmp_path, n)
    killed = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    ended = job.end(timeout=DEAD_RANK_LIMIT_S + 30)
    survivors = [rank for rank, pid in pids.items() if _alive(pid)]
    assert not survivors, f"rank(s) {survivors} outlived mpirun\n{job.tail()}"
    assert ended - killed < DEAD_RANK_LIMIT_S, f"took {ended - killed:.1f} s\n{job.tail()}"
    assert job.proc.returncode != 0, job.tail()
    # whoever reports first names the killed rank: mpirun (its death), or the rank after
    # it, whose gloo receive saw the connection reset before mpirun's report
    named_by_mpirun = f"rank {victim} with PID {pids[victim]}" in job.output
    named_by_peer = re.search(
        rf"\[rank {victim + 1}/{n} \S+\] FATAL: .*\n(.*\n)*?.*activations from rank {victim} "
        rf"over gloo failed \(rank {victim} may have died",
        job.output,
    )
    assert named_by_mpirun or named_by_peer, job.tail()
    assert "DONE" not in job.output, job.tail()


def test_stage_exception_aborts_the_gloo_job_naming_the_rank(jobs) -> None:  # noqa: F811
    n, rank = 2, 1
    args = [*ppruntime_cmd(), "generate", "--prompt", "a fault", "--max-tokens", "400"]
    args += ["--ignore-eos", "--quiet", "--activation-channel", "gloo"]
    job = Job(n, args, env={"PPRUNTIME_FAULT": f"{rank}:5", "PPRUNTIME_STAGE_DELAY_MS": "0:5"})
    jobs.append(job)
    fatal = job.wait_for(lambda: "FATAL" in job.output, START_TIMEOUT_S, "FATAL message")
    ended = job.end(timeout=FAULT_LIMIT_S + 30)
    assert ended - fatal < FAULT_LIMIT_S, f"abort took {ended - fatal:.1f} s\n{job.tail()}"
    assert job.proc.returncode != 0, job.tail()
    assert re.search(rf"\[rank {rank}/{n} \S+\] FATAL: .*rank {rank}", job.output), job.tail()
    assert f"injected failure in forward 5 of rank {rank}" in job.output, job.tail()
    assert "activation channel: gloo" in job.output, job.tail()


def test_stalled_rank_is_named_by_the_watchdog_with_gloo(jobs) -> None:  # noqa: F811
    n, rank = 2, 1
    args = [*ppruntime_cmd(), "generate", "--prompt", "a stall", "--max-tokens", "400"]
    args += ["--ignore-eos", "--quiet", "--watchdog-timeout", str(WATCHDOG_TIMEOUT_S)]
    job = Job(n, args, env={**GLOO, "PPRUNTIME_STALL": f"{rank}:5"})
    jobs.append(job)
    ready = job.wait_for(lambda: "microbatch slots" in job.output, START_TIMEOUT_S, "start-up")
    ended = job.end(timeout=WATCHDOG_TIMEOUT_S + WATCHDOG_SLACK_S + 30)
    took = ended - ready
    assert took < WATCHDOG_TIMEOUT_S + WATCHDOG_SLACK_S, f"took {took:.1f} s\n{job.tail()}"
    assert job.proc.returncode != 0, job.tail()
    assert "activation channel: gloo" in job.output, job.tail()
    assert f"stalled rank(s): {rank} " in job.output, job.tail()
    assert "FATAL: watchdog" in job.output, job.tail()


def test_sigterm_drains_the_gloo_job_cleanly(tmp_path: Path, jobs) -> None:  # noqa: F811
    n = 2
    job = _long_gloo_generation(n, tmp_path, jobs)
    pids = _rank_pids(tmp_path, n)
    signalled = time.monotonic()
    job.proc.send_signal(signal.SIGTERM)  # to mpirun, which forwards it to every rank
    ended = job.end(timeout=SIGTERM_LIMIT_S + 30)
    deadline = time.monotonic() + 2
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [rank for rank, pid in pids.items() if _alive(pid)], job.tail()
    assert ended - signalled < SIGTERM_LIMIT_S, f"took {ended - signalled:.1f} s\n{job.tail()}"
    outputs = (tmp_path / "outputs.jsonl").read_text().splitlines()
    assert [json.loads(line)["finish_reason"] for line in outputs] == ["abort"] * 4, outputs
    reports = json.loads((tmp_path / "reports.json").read_text())
    assert [r[0] for r in reports] == list(range(n)), reports  # every rank reached the end

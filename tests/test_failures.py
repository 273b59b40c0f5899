"""A dead rank, a failing stage, a stalled stage, SIGTERM, cancellation and KV exhaustion.

Every job is an `mpirun` subprocess in its own session with a hard timeout that kills
the whole session (tests/launching.py); nothing is left behind. Job scripts live in
tests/failure_scripts/.
"""

from __future__ import annotations

import json
import os
import re
import selectors
import signal
import sys
import time
from pathlib import Path

import pytest
from launching import REPO_ROOT, kill_job, ppruntime_cmd, run_mpi, start_mpi

SCRIPTS = REPO_ROOT / "tests" / "failure_scripts"
LONG_GENERATE = str(SCRIPTS / "long_generate.py")
LOAD_JOB = str(SCRIPTS / "load_job.py")
pytestmark = pytest.mark.timeout(240)
ENV = {"PYTHONPATH": str(REPO_ROOT)}
START_TIMEOUT_S = 90  # start-up of a job on a busy two-core machine
DEAD_RANK_LIMIT_S = 30
FAULT_LIMIT_S = 10
SIGTERM_LIMIT_S = 10
WATCHDOG_TIMEOUT_S = 3
WATCHDOG_SLACK_S = 7  # the watchdog polls, then collects the other ranks' stacks


class Job:
    """An MPI job whose merged output is read as it comes, with arrival times."""

    def __init__(self, n: int, args: list[str], env: dict[str, str] | None = None) -> None:
        self.proc = start_mpi(n, args, env={**ENV, **(env or {})}, merge_stderr=True)
        self.started = time.monotonic()
        self.output = ""
        self.ended_at: float | None = None
        self._selector = selectors.DefaultSelector()
        assert self.proc.stdout is not None
        self._selector.register(self.proc.stdout, selectors.EVENT_READ)

    def _read(self, timeout: float) -> bool:
        """Read what is there (waiting up to `timeout`); False at end of output."""
        if not self._selector.select(timeout=timeout):
            return True
        chunk = os.read(self.proc.stdout.fileno(), 65536)
        if not chunk:
            return False
        self.output += chunk.decode(errors="replace")
        return True

    def wait_for(self, predicate, timeout: float, what: str) -> float:
        """Read until predicate() holds; returns the time it first held."""
        deadline = time.monotonic() + timeout
        while not predicate():
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"{what}: not seen within {timeout:.0f} s\n{self.tail()}")
            if not self._read(0.05) and not predicate():
                self.end(timeout=5)
                raise AssertionError(f"{what}: the job ended first\n{self.tail()}")
        return time.monotonic()

    def end(self, timeout: float) -> float:
        """Wait for the end of the job (all output read); returns when mpirun exited."""
        deadline = time.monotonic() + timeout
        while self._read(0.05):
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"job still running after {timeout:.0f} s\n{self.tail()}")
        try:
            self.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except Exception:
            self.kill()
            raise
        self.ended_at = time.monotonic()
        return self.ended_at

    def kill(self) -> None:
        stdout, _ = kill_job(self.proc)
        self.output += stdout or ""
        self._selector.close()

    def tail(self, chars: int = 8000) -> str:
        return f"[exit {self.proc.returncode}]\n" + self.output[-chars:]


@pytest.fixture
def jobs():
    """Jobs started by a test; whatever is left of them is killed at the end."""
    started: list[Job] = []
    yield started
    for job in started:
        kill_job(job.proc)  # also SIGKILLs stragglers of the job's session


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _rank_pids(marker_dir: Path, n: int) -> dict[int, int]:
    return {rank: int((marker_dir / f"pid.{rank}").read_text()) for rank in range(n)}


def _long_generation(n: int, tmp_path: Path, jobs: list[Job], **kw) -> tuple[Job, float]:
    """Start a long generation on n ranks; return once every prompt is generating."""
    args = [sys.executable, LONG_GENERATE, str(tmp_path)]
    env = {
        "PPRUNTIME_STAGE_DELAY_MS": "0:5",  # a long run (> 30 s) if nothing stops it
        "PPRUNTIME_LOG_DIR": str(tmp_path / "logs"),  # what --log-dir sets
    }
    for key, value in kw.items():
        args += [f"--{key.replace('_', '-')}", str(value)]
    job = Job(n, args, env=env)
    jobs.append(job)
    seen = job.wait_for(lambda: "GENERATING" in job.output, START_TIMEOUT_S, "generation")
    return job, seen


# =====================================================================================
# dead rank
# =====================================================================================
@pytest.mark.parametrize(("n", "victim"), [(2, 1), (3, 1), (3, 2), (2, 0)])
def test_killed_rank_ends_the_job_everywhere(n: int, victim: int, tmp_path: Path, jobs) -> None:
    job, _ = _long_generation(n, tmp_path, jobs)
    pids = _rank_pids(tmp_path, n)
    killed = time.monotonic()
    os.kill(pids[victim], signal.SIGKILL)
    ended = job.end(timeout=DEAD_RANK_LIMIT_S + 30)
    survivors = [rank for rank, pid in pids.items() if _alive(pid)]
    assert not survivors, f"rank(s) {survivors} outlived mpirun\n{job.tail()}"
    assert ended - killed < DEAD_RANK_LIMIT_S, f"took {ended - killed:.1f} s\n{job.tail()}"
    assert job.proc.returncode != 0, job.tail()
    assert f"rank {victim} with PID {pids[victim]}" in job.output, job.tail()
    assert "signal 9" in job.output, job.tail()
    assert "DONE" not in job.output, job.tail()


# =====================================================================================
# exception in a stage
# =====================================================================================
@pytest.mark.parametrize(("n", "rank"), [(2, 1), (3, 2), (3, 0)])
def test_stage_exception_aborts_with_rank_and_traceback(n: int, rank: int, jobs) -> None:
    args = [*ppruntime_cmd(), "generate", "--prompt", "a fault", "--max-tokens", "400"]
    args += ["--ignore-eos", "--quiet"]
    job = Job(n, args, env={"PPRUNTIME_FAULT": f"{rank}:5", "PPRUNTIME_STAGE_DELAY_MS": "0:5"})
    jobs.append(job)
    fatal = job.wait_for(lambda: "FATAL" in job.output, START_TIMEOUT_S, "FATAL message")
    ended = job.end(timeout=FAULT_LIMIT_S + 30)
    assert ended - fatal < FAULT_LIMIT_S, f"abort took {ended - fatal:.1f} s\n{job.tail()}"
    assert job.proc.returncode != 0, job.tail()
    output = job.output
    assert re.search(rf"\[rank {rank}/{n} \S+\] FATAL: .*rank {rank}", output), job.tail()
    assert "Traceback (most recent call last)" in output, job.tail()
    assert "debug_knobs.py" in output and "InjectedFault" in output, job.tail()
    assert f"injected failure in forward 5 of rank {rank}" in output, job.tail()


# =====================================================================================
# stall: the watchdog names the stalled rank and aborts
# =====================================================================================
@pytest.mark.parametrize(("n", "rank"), [(2, 1), (3, 1)])
def test_stalled_rank_is_named_by_the_watchdog(n: int, rank: int, jobs) -> None:
    args = [*ppruntime_cmd(), "generate", "--prompt", "a stall", "--max-tokens", "400"]
    args += ["--ignore-eos", "--quiet", "--watchdog-timeout", str(WATCHDOG_TIMEOUT_S)]
    job = Job(n, args, env={"PPRUNTIME_STALL": f"{rank}:5"})
    jobs.append(job)
    # engine ready on rank 0: generation starts at once and stalls at forward 5 of `rank`
    ready = job.wait_for(lambda: "microbatch slots" in job.output, START_TIMEOUT_S, "start-up")
    ended = job.end(timeout=WATCHDOG_TIMEOUT_S + WATCHDOG_SLACK_S + 30)
    took = ended - ready
    assert took < WATCHDOG_TIMEOUT_S + WATCHDOG_SLACK_S, f"took {took:.1f} s\n{job.tail()}"
    assert job.proc.returncode != 0, job.tail()
    output = job.output
    for other in range(n):  # every rank dumped its stacks
        assert f"[rank {other}/{n} " in output, job.tail()
    assert output.count("stacks of this rank") >= n, job.tail()
    assert f"stalled rank(s): {rank} " in output, job.tail()
    assert "debug_knobs.py" in output, f"the stalled stack is missing\n{job.tail()}"
    assert "FATAL: watchdog" in output, job.tail()


# =====================================================================================
# SIGTERM (what Slurm sends at the time limit)
# =====================================================================================
@pytest.mark.parametrize("n", [2, 3])
def test_sigterm_aborts_running_requests_and_exits(n: int, tmp_path: Path, jobs) -> None:
    job, _ = _long_generation(n, tmp_path, jobs)
    pids = _rank_pids(tmp_path, n)
    signalled = time.monotonic()
    # to every rank, as Slurm's time limit does under srun; not to mpirun, which would
    # SIGKILL every rank ~0.5 s after forwarding it (Open MPI 5) and so race rank 0's
    # writes below under load (tests/test_abort_on_error.py signals mpirun)
    for pid in pids.values():
        os.kill(pid, signal.SIGTERM)
    ended = job.end(timeout=SIGTERM_LIMIT_S + 30)
    deadline = time.monotonic() + 2
    while any(_alive(pid) for pid in pids.values()) and time.monotonic() < deadline:
        time.sleep(0.05)
    survivors = [rank for rank, pid in pids.items() if _alive(pid)]
    assert not survivors, f"rank(s) {survivors} outlived mpirun\n{job.tail()}"
    assert ended - signalled < SIGTERM_LIMIT_S, f"took {ended - signalled:.1f} s\n{job.tail()}"
    # the script's files tell what rank 0 did (as --log-dir and --output do for a real job)
    outputs_file = tmp_path / "outputs.jsonl"
    assert outputs_file.exists(), f"rank 0 did not finish its requests\n{job.tail()}"
    outputs = [json.loads(line) for line in outputs_file.read_text().splitlines()]
    assert len(outputs) == 4, outputs
    for output in outputs:
        assert output["finish_reason"] == "abort", outputs
        assert 0 < output["tokens"] < 1500, outputs
    log = (tmp_path / "logs" / "rank-0.log").read_text()
    assert "SIGTERM received: no new requests; aborting 4 unfinished request(s)" in log, log
    reports = json.loads((tmp_path / "reports.json").read_text())
    assert [r[0] for r in reports] == list(range(n)), reports
    for rank, free, total in reports:
        assert free == total, f"rank {rank}: {free} of {total} KV blocks free"


# =====================================================================================
# cancellation under load, and more requests than the KV cache holds
# =====================================================================================
def test_cancellation_under_load_and_kv_exhaustion() -> None:
    result = run_mpi(2, [sys.executable, LOAD_JOB, "--requests", "150"], timeout=150, env=ENV)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-8000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, output[-8000:]
    summary = json.loads(lines[0].removeprefix("RESULT "))
    cancel, kv = summary["cancel"], summary["kv"]
    assert cancel["submitted"] == cancel["finished"] == 150, summary
    assert 0 < cancel["aborted"] <= cancel["abort_asked"] < 150, summary
    for rank, free, total in cancel["reports"] + kv["reports"]:
        assert free == total, f"rank {rank}: {free} of {total} KV blocks free\n{summary}"
    assert kv["requests"] == 12, summary

"""A frozen rank (SIGSTOP) ends the job, named, at any position, mid-run and at start-up.

A stopped process cannot report anything itself, and a blocking wait for it never
ends: the live ranks must notice (the watchdog mid-run, the start-up deadline
before), name it and abort, and mpirun must then end every process, the stopped
one included. All jobs of this file run at once (one module fixture), as each
spends most of its time waiting; each test then checks its own job's outcome.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from launching import REPO_ROOT, _session_members, kill_job, ppruntime_cmd, start_mpi

SCRIPTS = REPO_ROOT / "tests" / "failure_scripts"
ENV = {"PYTHONPATH": str(REPO_ROOT)}
pytestmark = pytest.mark.timeout(400)

WATCHDOG_TIMEOUT_S = 5
STARTUP_TIMEOUT_S = 15
START_LIMIT_S = 240  # until every job generates, all of them starting at once on two cores
END_LIMIT_S = 90  # from the stop to the end of mpirun: generous, the machine is shared


@dataclass(frozen=True)
class Case:
    name: str
    n: int
    victim: int
    where: str  # "mid-run", "gil" (stuck in a C call), or where start-up stops: "loading", "engine"


MID_RUN = [
    Case(f"pp{n}-rank{v}", n, v, "mid-run") for n, v in [(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)]
]
# a C call that holds the GIL: no thread of that rank can answer (PPRUNTIME_STALL_GIL)
IN_C_CALL = [Case("pp3-rank1-gil", 3, 1, "gil")]
STARTUP = [Case("pp3-rank2-loading", 3, 2, "loading"), Case("pp2-rank1-engine", 2, 1, "engine")]


@dataclass
class Outcome:
    case: Case
    marker_dir: Path
    proc: object = None
    chunks: list[str] = field(default_factory=list)
    pids: dict[int, int] = field(default_factory=dict)
    stopped_at: float | None = None
    ended_at: float | None = None
    leftovers: list[int] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def output(self) -> str:
        return "".join(self.chunks)

    def tail(self) -> str:
        code = None if self.proc is None else self.proc.returncode
        return f"[{self.case.name}: exit {code}]\n" + self.output[-8000:]


def _command(case: Case, marker_dir: Path) -> list[str]:
    if case.where == "gil":
        generate = ["generate", "--prompt", "a stall", "--max-tokens", "400", "--ignore-eos"]
        return [*ppruntime_cmd(), *generate, "--watchdog-timeout", str(WATCHDOG_TIMEOUT_S)]
    if case.where == "mid-run":
        return [
            sys.executable,
            str(SCRIPTS / "long_generate.py"),
            str(marker_dir),
            "--watchdog-timeout",
            str(WATCHDOG_TIMEOUT_S),
        ]
    generate = ["--preset", "tiny", "--prompt", "hello", "--max-tokens", "4", "--quiet"]
    generate += ["--startup-timeout", str(STARTUP_TIMEOUT_S)]
    script = [sys.executable, str(SCRIPTS / "stop_at_startup.py"), str(marker_dir)]
    return [*script, str(case.victim), case.where, "--", *generate]


def _start(outcome: Outcome) -> None:
    env = {**ENV, "PPRUNTIME_STAGE_DELAY_MS": "0:5"}  # a long run if nothing stops it
    if outcome.case.where == "gil":
        env["PPRUNTIME_STALL_GIL"] = f"{outcome.case.victim}:5"
    outcome.proc = start_mpi(
        outcome.case.n, _command(outcome.case, outcome.marker_dir), env=env, merge_stderr=True
    )

    def read() -> None:
        for line in outcome.proc.stdout:
            outcome.chunks.append(line)

    outcome.reader = threading.Thread(target=read, daemon=True)
    outcome.reader.start()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


def _read_pids(outcome: Outcome) -> None:
    for rank in range(outcome.case.n):
        path = outcome.marker_dir / f"pid.{rank}"
        if rank not in outcome.pids and path.exists() and path.read_text():
            outcome.pids[rank] = int(path.read_text())


def _release(outcome: Outcome) -> None:
    """Leave nothing behind: wake and kill every rank still there, then the job."""
    _read_pids(outcome)
    for pid in outcome.pids.values():
        if _alive(pid):
            for sig in (signal.SIGCONT, signal.SIGKILL):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
    if outcome.proc is not None:
        kill_job(outcome.proc)


def _stop_when_due(outcome: Outcome, now: float) -> None:
    """Start a case's clock at its stop: SIGSTOP once generating (mid-run), the engine
    ready (gil: forward 5 then stalls), or the victim's pid written (it stops itself)."""
    where = outcome.case.where
    if where == "mid-run":
        if "GENERATING" in outcome.output:
            _read_pids(outcome)
            os.kill(outcome.pids[outcome.case.victim], signal.SIGSTOP)
            outcome.stopped_at = now
    elif where == "gil":
        if "microbatch slots" in outcome.output:
            outcome.stopped_at = now
    else:
        _read_pids(outcome)
        if outcome.case.victim in outcome.pids:
            outcome.stopped_at = now


def _drive(outcomes: list[Outcome]) -> None:
    """Stop each mid-run victim once its job generates; wait for every job to end."""
    started = time.monotonic()
    while any(o.ended_at is None for o in outcomes):
        now = time.monotonic()
        for outcome in outcomes:
            if outcome.ended_at is not None:
                continue
            if outcome.proc.poll() is not None:
                outcome.ended_at = now
                continue
            if outcome.stopped_at is None:
                _stop_when_due(outcome, now)
            limit = END_LIMIT_S if outcome.stopped_at is not None else START_LIMIT_S
            if now - (outcome.stopped_at or started) > limit:
                outcome.ended_at = now
                _release(outcome)  # the test of this case then fails on its exit time
        time.sleep(0.1)
    time.sleep(1)  # mpirun has exited: give the ranks' ends a moment to be seen
    for outcome in outcomes:
        outcome.reader.join(timeout=10)  # the output to its end
        _read_pids(outcome)
        stopped = [pid for pid in outcome.pids.values() if _alive(pid)]
        outcome.leftovers = sorted(set(stopped) | set(_session_members(outcome.proc.pid)))


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory) -> dict[str, Outcome]:
    results = {}
    for case in MID_RUN + IN_C_CALL + STARTUP:
        results[case.name] = Outcome(case, tmp_path_factory.mktemp(case.name))
    try:
        for outcome in results.values():
            _start(outcome)
        _drive(list(results.values()))
        yield results
    finally:
        for outcome in results.values():
            _release(outcome)


def _check_ended_cleanly(outcome: Outcome) -> None:
    assert outcome.stopped_at is not None, f"the victim was never stopped\n{outcome.tail()}"
    took = outcome.ended_at - outcome.stopped_at
    print(f"{outcome.case.name}: mpirun ended {took:.1f} s after the stop")  # shown with -s
    assert took < END_LIMIT_S, f"took {took:.0f} s after the stop\n{outcome.tail()}"
    assert outcome.proc.returncode != 0, outcome.tail()
    assert not outcome.leftovers, f"pid(s) {outcome.leftovers} outlived mpirun\n{outcome.tail()}"


@pytest.mark.parametrize("case", MID_RUN + IN_C_CALL, ids=lambda c: c.name)
def test_rank_stopped_mid_run_is_named_and_the_job_aborts(case: Case, outcomes) -> None:
    outcome = outcomes[case.name]
    _check_ended_cleanly(outcome)
    output = outcome.output
    n, victim = case.n, case.victim
    assert "DONE" not in output, outcome.tail()
    assert re.search(rf"FATAL: watchdog: .*stalled rank\(s\): {victim} \(", output), outcome.tail()
    assert f"rank {victim}: no answer within" in output, outcome.tail()
    for rank in range(n):  # every live rank printed its stacks
        if rank != victim:
            dumped = rf"\[rank {rank}/{n} \S+\] watchdog: .*stacks of this rank"
            assert re.search(dumped, output), f"no stacks from rank {rank}\n{outcome.tail()}"


@pytest.mark.parametrize("case", STARTUP, ids=lambda c: c.name)
def test_rank_stopped_during_startup_is_named_with_the_flag(case: Case, outcomes) -> None:
    outcome = outcomes[case.name]
    _check_ended_cleanly(outcome)
    expected = (
        rf"FATAL: rank {case.victim} did not finish start-up within {STARTUP_TIMEOUT_S} s "
        rf"\(--startup-timeout"
    )
    assert re.search(expected, outcome.output), outcome.tail()

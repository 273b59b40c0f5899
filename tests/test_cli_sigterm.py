"""`ppruntime generate` under SIGTERM, as Slurm sends it: a single process, no mpirun.

The first SIGTERM stops it in order: running requests end "abort" with the tokens they
had, their JSON records are printed, and the process exits 143. A second SIGTERM aborts
at once: nothing more is printed. (Under mpirun: tests/test_failures.py.) Both
processes run at the same time.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from launching import REPO_ROOT, kill_job, mpi_env

pytestmark = pytest.mark.timeout(240)
START_TIMEOUT_S = 120  # interpreter, torch and the engine on a busy two-core machine
READY = "microbatch slots"  # rank 0's INFO line once the engine runs
MAX_TOKENS = 2000
CLI = [sys.executable, "-m", "ppruntime", "generate", "--json", "--quiet", "--ignore-eos"]


def _start(tmp_path: Path, name: str, delay_ms: int) -> tuple[subprocess.Popen, Path]:
    stderr = tmp_path / f"{name}.stderr"
    args = [*CLI, "--prompt", "hello", "--prompt", "abc", "--max-tokens", str(MAX_TOKENS)]
    proc = subprocess.Popen(
        args,
        cwd=str(REPO_ROOT),
        env=mpi_env({"PPRUNTIME_DEVICE": "cpu", "PPRUNTIME_STAGE_DELAY_MS": f"0:{delay_ms}"}),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr.open("w"),
        text=True,
        start_new_session=True,
    )
    return proc, stderr


def _wait_ready(proc: subprocess.Popen, stderr: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while READY not in stderr.read_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            kill_job(proc)
            raise AssertionError(
                f"engine not ready (exit {proc.returncode}):\n{stderr.read_text()}"
            )
        time.sleep(0.1)


def _finish(proc: subprocess.Popen, stderr: Path, timeout: float = 60) -> tuple[str, str]:
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        raise AssertionError(
            f"still running {timeout} s after SIGTERM:\n{stderr.read_text()}"
        ) from None
    return stdout, stderr.read_text()


def test_sigterm_once_aborts_running_requests_exit_143_and_twice_aborts_at_once(tmp_path):
    # `once` computes quickly (10 ms per forward); `twice` sits in 4-second forwards, so
    # an orderly stop would take seconds and print the records
    once, once_err = _start(tmp_path, "once", delay_ms=10)
    twice, twice_err = _start(tmp_path, "twice", delay_ms=4000)
    try:
        _wait_ready(twice, twice_err)
        time.sleep(0.5)  # inside its first forward
        twice.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        twice.send_signal(signal.SIGTERM)
        _wait_ready(once, once_err)
        time.sleep(3.0)  # some tokens generated (at most ~300)
        once.send_signal(signal.SIGTERM)
        once_out, once_log = _finish(once, once_err)
        twice_out, twice_log = _finish(twice, twice_err)
    finally:
        for proc in (once, twice):
            if proc.poll() is None:
                kill_job(proc)
    # first SIGTERM: an orderly stop
    assert once.returncode == 143, once_log[-3000:]
    assert "SIGTERM received: no new requests; aborting 2 unfinished request(s)" in once_log
    records = [json.loads(line) for line in once_out.splitlines()]
    assert [r["finish_reason"] for r in records] == ["abort", "abort"], records
    for record in records:
        assert 0 < len(record["token_ids"]) < MAX_TOKENS, record
    # second SIGTERM: aborted at once, nothing printed
    assert twice.returncode == 143, twice_log[-3000:]
    assert "FATAL: second signal 15 received, aborting" in twice_log, twice_log[-3000:]
    assert twice_out == "", twice_out

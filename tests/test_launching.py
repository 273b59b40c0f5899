"""tests/launching.py itself: a job that outlives its timeout is killed, all of it."""

from __future__ import annotations

import re
import time

import pytest
from launching import _session_members, has_exited, python_cmd, run_mpi, start_mpi, wait_mpi


def test_timeout_kills_the_whole_job() -> None:
    script = "import os, time; print('pid', os.getpid(), flush=True); time.sleep(600)"
    proc = start_mpi(2, [*python_cmd(), "-c", script])
    started = time.monotonic()
    with pytest.raises(AssertionError, match="timed out after 3 s") as raised:
        wait_mpi(proc, timeout=3)
    assert time.monotonic() - started < 15
    assert proc.returncode is not None
    assert _session_members(proc.pid) == []
    pids = [int(pid) for pid in re.findall(r"^pid (\d+)$", str(raised.value), re.MULTILINE)]
    assert len(pids) == 2, raised.value
    for pid in pids:  # the ranks printed their pids before sleeping
        assert has_exited(pid), f"rank {pid} survived"


def test_run_mpi_returns_output_and_status() -> None:
    result = run_mpi(
        2, [*python_cmd(), "-c", "import os; print(os.environ['OMP_NUM_THREADS'])"], timeout=60
    )
    assert result.returncode == 0, result
    assert result.stdout.split() == ["1", "1"]

"""An exception on one rank ends the whole job; SIGTERM stops every rank cleanly."""

from __future__ import annotations

import os
import selectors
import signal
import textwrap
import time
from pathlib import Path

from launching import REPO_ROOT, describe, kill_job, python_cmd, run_mpi, start_mpi, wait_mpi

ENV = {"PYTHONPATH": str(REPO_ROOT)}


def _script(tmp_path: Path, name: str, source: str) -> str:
    path = tmp_path / name
    path.write_text(textwrap.dedent(source))
    return str(path)


def test_exception_on_one_rank_aborts_the_job(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        "boom.py",
        """
        from mpi4py import MPI
        from ppruntime.bootstrap import bootstrap

        info = bootstrap()
        MPI.COMM_WORLD.Barrier()
        if info.rank == 1:
            raise RuntimeError("boom on rank 1")
        MPI.COMM_WORLD.recv(source=1)  # never sent: without the abort, a hang
        """,
    )
    started = time.monotonic()
    result = run_mpi(2, [*python_cmd(), script], timeout=60, env=ENV)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode != 0, describe(result)
    assert elapsed < 30, f"abort took {elapsed:.1f} s\n{describe(result)}"
    assert "[rank 1/2 " in output and "FATAL" in output, describe(result)
    assert "unhandled exception on rank 1" in output, describe(result)
    assert "Traceback" in output and "RuntimeError: boom on rank 1" in output, describe(result)


def test_sigterm_stops_every_rank_cleanly(tmp_path: Path) -> None:
    script = _script(
        tmp_path,
        "sleeper.py",
        """
        from mpi4py import MPI
        from ppruntime.bootstrap import bootstrap
        from ppruntime.comm.failure import termination_requested

        import signal

        info = bootstrap()
        installed = signal.getsignal(signal.SIGTERM)  # ppruntime's

        def handler(signum, frame):
            # the marker is written in the handler itself: Open MPI 5's mpirun SIGKILLs
            # the ranks ~0.2 s after forwarding, too soon to count on a loop's wake-up
            installed(signum, frame)
            if termination_requested.is_set():
                with open(f"{MARKERS}/stopped.{info.rank}", "w") as marker:
                    marker.write(f"rank {info.rank} stopping cleanly")

        signal.signal(signal.SIGTERM, handler)
        MPI.COMM_WORLD.Barrier()
        print(f"rank {info.rank} ready", flush=True)
        while not termination_requested.wait(0.1):
            pass
        print(f"rank {info.rank} stopping cleanly", flush=True)
        """.replace("{MARKERS}", str(tmp_path)),
    )
    proc = start_mpi(2, [*python_cmd(), script], env=ENV, merge_stderr=True)
    assert proc.stdout is not None
    seen = ""  # read from the raw pipe: a buffered readline would hide lines from select
    deadline = time.monotonic() + 60
    with selectors.DefaultSelector() as selector:
        selector.register(proc.stdout, selectors.EVENT_READ)
        while seen.count(" ready\n") < 2 and time.monotonic() < deadline:
            if selector.select(timeout=1.0):
                chunk = os.read(proc.stdout.fileno(), 65536)
                if not chunk:
                    break
                seen += chunk.decode(errors="replace")
    if seen.count(" ready\n") < 2:
        rest, _ = kill_job(proc)
        raise AssertionError("ranks never became ready:\n" + seen + rest)

    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)  # mpirun forwards it to every rank
    result = wait_mpi(proc, timeout=30)
    elapsed = time.monotonic() - signalled
    output = seen + result.stdout
    # Open MPI stops forwarding the ranks' output once mpirun itself got SIGTERM, so
    # the ranks also leave a marker file (what --log-dir does for a real job), written
    # when ppruntime's handler has set the termination flag.
    for rank in (0, 1):
        marker = tmp_path / f"stopped.{rank}"
        assert marker.exists(), f"rank {rank} did not stop cleanly\n{output}"
        assert marker.read_text() == f"rank {rank} stopping cleanly"
    assert elapsed < 10, f"job took {elapsed:.1f} s to stop after SIGTERM\n{output}"

"""Starting MPI jobs from tests, without ever leaving a process behind.

Every job runs in its own session (`start_new_session=True`), so on a timeout the
whole job (mpirun, its daemons and every rank) can be ended at once: SIGTERM to the
process group, a short grace, then SIGKILL to everything still in the session.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from ppruntime.comm.mpirun import find_mpirun as _find_mpirun
from ppruntime.comm.mpirun import job_free_environment, mpirun_command

REPO_ROOT = Path(__file__).resolve().parent.parent
TERM_GRACE_S = 3.0
OUTPUT_TAIL_CHARS = 6000


def find_mpirun() -> str:
    """The mpirun matching this interpreter's mpi4py: $MPIRUN, the venv's, then PATH."""
    return _find_mpirun(REPO_ROOT)


def python_cmd() -> list[str]:
    return [sys.executable]


def ppruntime_cmd() -> list[str]:
    return [sys.executable, "-m", "ppruntime"]


def mpi_command(n: int, args: Sequence[str], oversubscribe: bool = True) -> list[str]:
    """`mpirun -n N [--allow-run-as-root] [--oversubscribe] args...`."""
    return mpirun_command(find_mpirun(), n, args, oversubscribe)


def mpi_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, minus any enclosing job's, plus one thread per rank."""
    child = job_free_environment()
    child["OMP_NUM_THREADS"] = "1"
    child["PYTHONUNBUFFERED"] = "1"
    if env:
        child.update(env)
    return child


def start_mpi(
    n: int,
    args: Sequence[str],
    env: Mapping[str, str] | None = None,
    oversubscribe: bool = True,
    merge_stderr: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[str]:
    """Start `mpirun -n N args...` in a new session, stdout (and stderr) piped."""
    return start_process(mpi_command(n, args, oversubscribe), mpi_env(env), merge_stderr, cwd)


def start_process(
    command: Sequence[str],
    env: Mapping[str, str],
    merge_stderr: bool = False,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.Popen[str]:
    """Start `command` in a new session (so `kill_job` reaches all of it), output piped."""
    return subprocess.Popen(
        list(command),
        env=dict(env),
        cwd=str(cwd if cwd is not None else REPO_ROOT),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT if merge_stderr else subprocess.PIPE,
        text=True,
        errors="replace",
        start_new_session=True,
    )


def wait_all(
    procs: Sequence[subprocess.Popen[str]], timeout: float
) -> list[subprocess.CompletedProcess[str]]:
    """`wait_mpi` on each of jobs running at once; whatever still runs when one fails
    (or times out) is killed."""
    try:
        return [wait_mpi(proc, timeout) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                kill_job(proc)


def wait_mpi(proc: subprocess.Popen[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Wait for a job from `start_mpi`; on timeout kill it all and fail with its output."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stdout, stderr = kill_job(proc)
        raise AssertionError(
            f"MPI job timed out after {timeout:.0f} s and was killed: {_quote(proc.args)}\n"
            + format_output(stdout, stderr)
        ) from None
    except BaseException:  # KeyboardInterrupt, pytest-timeout, ...: leave nothing behind
        kill_job(proc)
        raise
    finally:
        _kill_session(proc.pid, signal.SIGKILL)  # stragglers of a job that did end
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout or "", stderr or "")


def run_mpi(
    n: int,
    args: Sequence[str],
    timeout: float,
    env: Mapping[str, str] | None = None,
    oversubscribe: bool = True,
    cwd: str | os.PathLike[str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run `mpirun -n N args...` to completion, capturing stdout and stderr.

    Raises AssertionError with the output's tail if it does not end within `timeout`
    seconds; the whole job is killed first.
    """
    proc = start_mpi(n, args, env=env, oversubscribe=oversubscribe, cwd=cwd)
    return wait_mpi(proc, timeout)


def has_exited(pid: int) -> bool:
    """The process is gone, or a zombie no one has reaped yet."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def kill_job(proc: subprocess.Popen[str]) -> tuple[str, str]:
    """SIGTERM the job's process group, then SIGKILL its whole session; return output."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        stdout, stderr = proc.communicate(timeout=TERM_GRACE_S)
    except subprocess.TimeoutExpired:
        _signal_group(proc.pid, signal.SIGKILL)
        _kill_session(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
    _kill_session(proc.pid, signal.SIGKILL)
    return stdout or "", stderr or ""


def format_output(stdout: str | None, stderr: str | None) -> str:
    return f"--- stdout (tail) ---\n{_tail(stdout)}\n--- stderr (tail) ---\n{_tail(stderr)}"


def describe(result: subprocess.CompletedProcess[str]) -> str:
    """Command, exit status and output tails, for assertion messages."""
    return f"{_quote(result.args)} exited {result.returncode}\n" + format_output(
        result.stdout, result.stderr
    )


def _tail(text: str | None) -> str:
    text = text or ""
    if len(text) <= OUTPUT_TAIL_CHARS:
        return text
    return "[...]\n" + text[-OUTPUT_TAIL_CHARS:]


def _quote(args: object) -> str:
    if isinstance(args, (list, tuple)):
        return " ".join(str(a) for a in args)
    return str(args)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _session_members(sid: int) -> list[int]:
    """Live (non-zombie) pids whose session id is `sid`, from Linux /proc. Processes
    that changed their process group (Open MPI puts each rank in its own) are found."""
    members = []
    try:
        entries = os.listdir("/proc")
    except OSError:
        return members
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # fields after the command: state ppid pgrp session ...
        if len(fields) > 3 and int(fields[3]) == sid and fields[0] not in ("Z", "X"):
            members.append(int(entry))
    return members


def _kill_session(sid: int, sig: signal.Signals, wait_s: float = 5.0) -> None:
    """Signal every process of the session, and wait (sleeping) until they are gone."""
    deadline = time.monotonic() + wait_s
    while True:
        members = _session_members(sid)
        if not members or time.monotonic() > deadline:
            return
        for pid in members:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)
        time.sleep(0.05)

"""Turning failures into a clean end of the whole job.

An uncaught exception on one rank would leave every other rank blocked on a
message that never comes. `install_abort_on_error()` makes any unhandled exception,
in any thread, print the rank, host and traceback and then abort COMM_WORLD, which
ends every rank with a non-zero status (the behaviour of `python -m mpi4py`).

SIGTERM (what Slurm sends every task at the time limit, and mpirun forwards) sets
`termination_requested`; the engine checks it between iterations and stops in an
orderly way. A second SIGTERM aborts at once. (Open MPI 5's mpirun SIGKILLs every rank
about half a second after forwarding a SIGTERM, so under mpirun only what is done by then
survives; a signal sent to the ranks themselves, as srun does, gets the whole orderly stop.)
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
import traceback
from types import TracebackType

from mpi4py import MPI

from ppruntime.comm.mpi_env import RankInfo

termination_requested = threading.Event()
"""Set by SIGTERM/SIGINT; the executor loop of rank 0 polls it between iterations."""

_installed_for: RankInfo | None = None


def report_and_abort(info: RankInfo, reason: str, exit_code: int = 1) -> None:
    """Print `reason` with this rank's identity, then end the whole job."""
    message = f"{info.prefix} FATAL: {reason}\n"
    try:
        sys.stderr.write(message)
        sys.stderr.flush()
        sys.stdout.flush()
    finally:
        if info.size > 1:
            MPI.COMM_WORLD.Abort(exit_code)
        else:
            import os

            os._exit(exit_code)


def format_exception(exc: BaseException) -> str:
    return "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    assert _installed_for is not None
    if issubclass(exc_type, KeyboardInterrupt) and _installed_for.size == 1:
        sys.__excepthook__(exc_type, exc, tb)
        return
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    report_and_abort(_installed_for, f"unhandled exception on rank {_installed_for.rank}:\n{text}")


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    assert _installed_for is not None
    if args.exc_type is SystemExit:
        return
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    name = args.thread.name if args.thread is not None else "?"
    report_and_abort(
        _installed_for,
        f"unhandled exception in thread {name!r} on rank {_installed_for.rank}:\n{text}",
    )


def _on_sigterm(signum: int, frame: object) -> None:
    if termination_requested.is_set():
        assert _installed_for is not None
        report_and_abort(_installed_for, f"second signal {signum} received, aborting", 143)
    termination_requested.set()


def install_abort_on_error(info: RankInfo, handle_sigterm: bool = True) -> None:
    """Install the abort-on-unhandled-exception hooks and the SIGTERM stop hook."""
    global _installed_for
    _installed_for = info
    sys.excepthook = _excepthook
    threading.excepthook = _thread_excepthook
    faulthandler.enable(file=sys.stderr, all_threads=True)
    if handle_sigterm and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)

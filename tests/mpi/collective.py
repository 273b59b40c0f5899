"""Agreeing on pass/fail across the ranks of an MPI test.

A plain assert that fails on one rank lets that rank move on to the next test while
the others block in a collective the failed rank will never join. `@collective`
runs the test body on every rank, catches what it raises, and then all ranks agree:
if any rank failed, every rank raises an AssertionError naming the failing ranks and
their errors (a skip on some rank skips everywhere). The agreement is a
non-blocking collective on its own communicator, polled with a sleep backoff; a
rank that does not arrive within `timeout` seconds turns the hang into a message
and `MPI.COMM_WORLD.Abort(1)`.
"""

from __future__ import annotations

import functools
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any, TypeVar, overload

import numpy as np
import pytest
from mpi4py import MPI

import ppruntime.comm.mpi_env  # noqa: F401  (ppruntime's mpi4py settings)

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_TIMEOUT_S = 120.0
_PASSED, _SKIPPED, _FAILED = 0, 1, 2

# Duplicated once, at import (collection happens in the same order on every rank,
# before any test body runs), so that agreement messages can never match a
# collective a failed test body left behind on COMM_WORLD.
_agreement_comm: MPI.Intracomm = MPI.COMM_WORLD.Dup()
_agreement_comm.Set_name("tests.collective")

_pytest_config: pytest.Config | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Hook (re-exported by tests/mpi/conftest.py): lets an abort message bypass
    pytest's output capture, which the abort would otherwise swallow."""
    global _pytest_config
    _pytest_config = config


def _print_uncaptured(text: str) -> None:
    capture = None
    if _pytest_config is not None:
        capture = _pytest_config.pluginmanager.getplugin("capturemanager")
    if capture is not None:
        capture.suspend_global_capture(in_=False)
    sys.stderr.write(text)
    sys.stderr.flush()


def wait_for(request: MPI.Request, timeout: float, what: str) -> None:
    """Complete `request`, sleeping between tests of it; abort the job on timeout."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while not request.Test():
        if time.monotonic() > deadline:
            rank = MPI.COMM_WORLD.Get_rank()
            _print_uncaptured(
                f"[rank {rank}] collective: {what}: not every rank arrived within "
                f"{timeout:.0f} s (a rank is stuck or dead); aborting the MPI job\n"
            )
            MPI.COMM_WORLD.Abort(1)
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def agree(status: int, message: str, what: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
    """All ranks exchange (status, message); raise on every rank if any failed."""
    __tracebackhide__ = True
    comm = _agreement_comm
    mine = np.array([status], dtype=np.int32)
    everyone = np.empty(comm.Get_size(), dtype=np.int32)
    wait_for(comm.Iallgather(mine, everyone), timeout, what)
    # Every rank has arrived, so a blocking exchange of the messages cannot hang.
    if everyone.max() == _PASSED:
        return
    messages = comm.allgather(message if status != _PASSED else "")
    failed = [r for r, s in enumerate(everyone) if s == _FAILED]
    if failed:
        detail = "\n".join(f"--- rank {r} ---\n{messages[r]}" for r in failed)
        raise AssertionError(f"{what} failed on rank(s) {failed}:\n{detail}")
    skipped = [r for r, s in enumerate(everyone) if s == _SKIPPED]
    pytest.skip(f"skipped on rank(s) {skipped}: {messages[skipped[0]]}")


@overload
def collective(fn: F) -> F: ...
@overload
def collective(*, timeout: float = DEFAULT_TIMEOUT_S) -> Callable[[F], F]: ...
def collective(fn: F | None = None, *, timeout: float = DEFAULT_TIMEOUT_S) -> Any:
    """Decorate an MPI test so that its outcome is the same on every rank."""

    def decorate(body: F) -> F:
        @functools.wraps(body)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            __tracebackhide__ = True
            status, message, error = _PASSED, "", None
            try:
                body(*args, **kwargs)
            except pytest.skip.Exception as exc:
                status, message = _SKIPPED, str(exc)
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as exc:  # AssertionError, pytest.fail, anything
                status, message, error = _FAILED, _format(exc), exc
            try:
                agree(status, message, body.__qualname__, timeout)
            except AssertionError as agreed:
                if error is not None:
                    raise agreed from error
                raise

        return wrapper  # type: ignore[return-value]

    return decorate(fn) if fn is not None else decorate


def _format(exc: BaseException) -> str:
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    return text[-4000:]

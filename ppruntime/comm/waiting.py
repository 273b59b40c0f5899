"""Waiting on MPI without spinning.

Open MPI's blocking calls poll the network at full speed, which steals one of the
two cores from the rank doing the real work. Every wait in ppruntime therefore
tests its request and sleeps with exponential backoff in between: the GIL is
released while sleeping, and each poll also drives MPI's progress engine for the
other messages of this process.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from mpi4py import MPI
from mpi4py.util import pkl5

_FIRST_SLEEP_S = 20e-6
MAX_SLEEP_S = float(os.environ.get("PPRUNTIME_POLL_MAX_US", "500")) * 1e-6
# A thread that mostly waits (the relay receiver) polls less often while nobody waits
# for what it receives: each wake-up takes the GIL and a core from the executor thread
# (50-80 us of the process's CPU a wake-up on two shared cores, bench_serve.py's per-rank
# table). Its consumer wakes it when it starts to wait (Hurry), so the slow polls only
# drive MPI progress meanwhile: the first after 1 ms (it was 200 us: 4-6 wake-ups an
# engine step of 2-3 ms instead of ~3, ~5 us of rank 0's CPU a token more).
BACKGROUND_FIRST_SLEEP_S = 1e-3
BACKGROUND_MAX_SLEEP_S = float(os.environ.get("PPRUNTIME_BACKGROUND_POLL_MAX_US", "2000")) * 1e-6


class SleepCounts:
    """How often this process's polled waits slept (each sleep is a wake-up: ~15 us of CPU
    on a small machine), for the per-rank counters (engine/rank_stats.py). Counted
    without a lock: a diagnostic figure, where a lost increment does not matter."""

    __slots__ = ("foreground", "background")

    def __init__(self) -> None:
        self.foreground = 0  # Backoff: a thread waiting for what it needs now
        self.background = 0  # PacedBackoff's slow phase: the relay thread while nobody waits


sleep_counts = SleepCounts()


class WaitAborted(RuntimeError):
    """The wait was given up because its stop condition became true."""


class Backoff:
    """Sleep durations that double from 20 us up to a cap (500 us by default)."""

    __slots__ = ("_next", "_max")

    def __init__(self, max_sleep_s: float = MAX_SLEEP_S) -> None:
        self._max = max_sleep_s
        self._next = 0.0

    def reset(self) -> None:
        self._next = 0.0

    def sleep(self) -> None:
        sleep_counts.foreground += 1
        if self._next == 0.0:
            time.sleep(0)  # first miss: just yield the GIL and the core
            self._next = _FIRST_SLEEP_S
            return
        time.sleep(self._next)
        self._next = min(self._next * 2.0, self._max)


class Hurry:
    """Lets a consumer tell a background poller that it now waits for its results.

    The relay thread polls slowly while the executor thread is busy (every poll takes
    the GIL from it, measured at a third of rank 0's host time per iteration with
    polls that restart fast after each message) and like a foreground wait while the
    executor waits for a ready batch. One consumer thread per rank.
    """

    __slots__ = ("urgent", "_event")

    def __init__(self) -> None:
        self.urgent = False
        self._event = threading.Event()

    def begin(self) -> None:
        """The consumer starts waiting: wake the poller if it sleeps."""
        self.urgent = True
        self._event.set()

    def end(self) -> None:
        self.urgent = False

    def sleep(self, seconds: float) -> None:
        """Sleep up to `seconds`; return early when the consumer starts waiting."""
        self._event.clear()
        if not self.urgent:  # a begin() after this check sets the event: no lost wake-up
            self._event.wait(seconds)


class PacedBackoff(Backoff):
    """A background poller's backoff: slow (1 ms doubling to the background cap)
    while its consumer is busy, a foreground `Backoff` while the consumer waits."""

    __slots__ = ("_hurry", "_slow_next")

    def __init__(self, hurry: Hurry) -> None:
        super().__init__(MAX_SLEEP_S)
        self._hurry = hurry
        self._slow_next = min(BACKGROUND_FIRST_SLEEP_S, BACKGROUND_MAX_SLEEP_S)

    def sleep(self) -> None:
        if self._hurry.urgent:
            super().sleep()
            return
        self._next = 0.0  # the next urgent phase starts polling at once
        sleep_counts.background += 1
        self._hurry.sleep(self._slow_next)
        self._slow_next = min(self._slow_next * 2.0, BACKGROUND_MAX_SLEEP_S)


class WaitTracker:
    """Tells the watchdog what this thread is waiting for, and since when.

    progress_count counts completed waits and units of work: the watchdog compares
    it before and after asking the other ranks. While paused (rank 0 between steps,
    in its caller's hands) the clocks stand still: `resume()` moves `since` and
    `progress_at` on by the pause, so only time spent inside the engine counts
    towards a stall, however often or rarely the caller steps.
    """

    __slots__ = (
        "waiting_for",
        "since",
        "progress_at",
        "progress_count",
        "paused",
        "paused_at",
        "on_poll",
    )

    def __init__(self) -> None:
        # work the thread still owes others, run between the polls of each of its waits
        # (e.g. posting activation sends whose device copies completed); never blocks
        self.on_poll: Callable[[], None] | None = None
        self.paused = False
        self.paused_at = 0.0
        self.waiting_for: str | None = None
        self.since = time.monotonic()
        self.progress_at = time.monotonic()
        self.progress_count = 0

    def begin(self, what: str) -> None:
        self.waiting_for = what
        self.since = time.monotonic()

    def end(self) -> None:
        self.waiting_for = None
        self.progress_at = time.monotonic()
        self.progress_count += 1

    def progress(self) -> None:
        """The thread completed a unit of work (an iteration)."""
        self.waiting_for = None
        self.progress_at = time.monotonic()
        self.progress_count += 1

    def pause(self) -> None:
        """The thread is back in its caller's hands (not a stall of the pipeline)."""
        self.paused_at = time.monotonic()
        self.paused = True

    def resume(self) -> None:
        """The caller stepped again: the time it kept the thread does not count."""
        if not self.paused:
            return
        gap = time.monotonic() - self.paused_at
        self.progress_at += gap
        self.since += gap
        self.paused = False

    def idle_seconds(self, now: float) -> float:
        """Seconds without progress, not counting pauses (0 while paused)."""
        if self.paused:
            return 0.0
        return now - max(self.progress_at, self.since)


def request_done(request: MPI.Request | pkl5.Request) -> bool:
    """Test a request of either kind (pkl5 requests are lowercase-only)."""
    if isinstance(request, MPI.Request):
        return request.Test()
    return request.test()[0]


def wait_request(
    request: MPI.Request | pkl5.Request,
    what: str,
    tracker: WaitTracker | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Wait for one request to complete, polling with backoff."""
    if request_done(request):
        return
    _poll(lambda: request_done(request), what, tracker, should_stop)


def wait_all(
    requests: Sequence[MPI.Request | pkl5.Request],
    what: str,
    tracker: WaitTracker | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> None:
    """Wait until every request in `requests` has completed."""
    pending = [r for r in requests if not request_done(r)]
    if not pending:
        return

    def all_done() -> bool:
        pending[:] = [r for r in pending if not request_done(r)]
        return not pending

    _poll(all_done, what, tracker, should_stop)


def wait_message(
    comm: pkl5.Intracomm,
    source: int,
    tag: int,
    what: str,
    tracker: WaitTracker | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> pkl5.Message:
    """Wait until a message from `source` with `tag` is matched; return it."""
    return _wait_matched(lambda: comm.improbe(source, tag), what, tracker, should_stop)


def recv_object(
    comm: pkl5.Intracomm,
    source: int,
    tag: int,
    what: str,
    tracker: WaitTracker | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> object:
    """Receive one pickled object (out-of-band buffers included) without spinning."""
    return wait_message(comm, source, tag, what, tracker, should_stop).recv()


def wait_until(done: Callable[[], bool], what: str, tracker: WaitTracker | None = None) -> None:
    """Poll `done()` with backoff until it is true (it may drive work, e.g. issue sends)."""
    if not done():
        _poll(done, what, tracker, None)


def _wait_matched(
    improbe: Callable[[], object | None],
    what: str,
    tracker: WaitTracker | None,
    should_stop: Callable[[], bool] | None,
    backoff: Backoff | None = None,
) -> Any:  # an MPI.Message or a pkl5.Message
    """Poll a matching probe until it returns a message."""
    matched = improbe()
    if matched is not None:
        return matched
    found: list[object] = []

    def probe() -> bool:
        message = improbe()
        if message is None:
            return False
        found.append(message)
        return True

    _poll(probe, what, tracker, should_stop, backoff)
    return found[0]


def _poll(
    done: Callable[[], bool],
    what: str,
    tracker: WaitTracker | None,
    should_stop: Callable[[], bool] | None,
    backoff: Backoff | None = None,
) -> None:
    if tracker is not None:
        tracker.begin(what)
    if backoff is None:
        backoff = Backoff()
    on_poll = tracker.on_poll if tracker is not None else None
    try:
        while not done():
            if should_stop is not None and should_stop():
                raise WaitAborted(f"stopped while waiting for {what}")
            if on_poll is not None:
                on_poll()
            backoff.sleep()
    finally:
        if tracker is not None:
            tracker.end()


def wait_raw_message(
    comm: MPI.Comm,
    source: int,
    tag: int,
    what: str,
    out: np.ndarray | None = None,
    dtype: np.dtype | type = np.int32,
    tracker: WaitTracker | None = None,
    should_stop: Callable[[], bool] | None = None,
    backoff: Backoff | None = None,
) -> np.ndarray:
    """Receive one raw (unpickled) message without spinning.

    With `out`, the message lands in a prefix of that preallocated buffer (a view
    is returned); without it, a new array of the message's size is returned.
    backoff: how to sleep between polls (default: a fresh foreground `Backoff`).
    """
    status = MPI.Status()
    message = _wait_matched(
        lambda: comm.Improbe(source, tag, status), what, tracker, should_stop, backoff
    )
    buffer_dtype = np.dtype(dtype if out is None else out.dtype)
    count = status.Get_count(MPI.BYTE) // buffer_dtype.itemsize
    if out is None:
        target = np.empty(count, dtype=buffer_dtype)
    else:
        if count > out.shape[0]:
            raise RuntimeError(
                f"{what}: message of {count} elements exceeds the "
                f"{out.shape[0]}-element receive buffer"
            )
        target = out[:count]
    message.Recv([target, MPI.BYTE])
    return target

"""The watchdog: a stall becomes every live rank's stack dump and an abort, never silence.

Each rank runs a watchdog thread with its own communicator. When this rank has work
in flight but has made no progress for `timeout_s` (waiting on a message that does
not come, or stuck inside a step; rank 0's clock stands still while its caller holds
it between steps), it asks every other rank for its state and stacks
(WATCHDOG_DUMP) and waits `reply_window(timeout_s)` for the answers. A rank that
does not answer in that window is itself the stalled rank (stopped, swapped out,
stuck in a call that holds the GIL, or on a lost node): the diagnosis never waits
on it. So is a rank that answers but whose watchdog thread had not run for
`frozen_threshold(timeout_s)` before: it was stopped and woke up again (as when
another rank's abort makes mpirun send SIGCONT to every rank), or held the GIL.
The live ranks' stacks are printed, one line names the stalled rank(s) and why, and
the job aborts. So any frozen rank, at any position, ends the job within about
timeout_s + 1 s (polling) + reply_window(timeout_s) of the last progress of the
rank that notices.
"""

from __future__ import annotations

import faulthandler
import itertools
import sys
import threading
import time
from collections.abc import Callable

from mpi4py import MPI
from mpi4py.util import pkl5

from ppruntime.comm.failure import report_and_abort
from ppruntime.comm.mpi_env import RankInfo
from ppruntime.comm.tags import Tag
from ppruntime.comm.waiting import WaitTracker, request_done
from ppruntime.engine.rank_stats import RankStatsExchange

MIN_REPLY_WINDOW_S = 5.0
MAX_REPLY_WINDOW_S = 30.0


def reply_window(timeout_s: float) -> float:
    """How long a diagnosis waits for the other ranks' answers: the timeout itself,
    but at least 5 s (a loaded machine) and at most 30 s."""
    return min(max(timeout_s, MIN_REPLY_WINDOW_S), MAX_REPLY_WINDOW_S)


def frozen_threshold(timeout_s: float) -> float:
    """A watchdog thread that did not run for this long was frozen, not just slow:
    half the timeout, but at least 2 s (its period is at most 1 s)."""
    return max(2.0, timeout_s / 2)


def _status(tracker: WaitTracker, now: float, frozen_s: float = 0.0) -> dict:
    """frozen_s: how long this rank's watchdog thread had not run before answering."""
    if tracker.paused:
        status = {"state": "paused", "seconds": now - tracker.paused_at}
    elif tracker.waiting_for is not None:
        status = {"state": "waiting", "for": tracker.waiting_for, "seconds": now - tracker.since}
    else:
        status = {"state": "busy", "seconds": now - tracker.progress_at}
    status["frozen_s"] = frozen_s
    return status


def describe(
    rank: int,
    status: dict | None,
    window_s: float = MIN_REPLY_WINDOW_S,
    frozen_s: float = float("inf"),
) -> str:
    """One rank's state in words; frozen_s: the frozen threshold."""
    if status is None:
        return (
            f"rank {rank}: no answer within {window_s:.0f}s (stopped, stuck in a call "
            f"that holds the GIL, or its node is lost)"
        )
    if status.get("frozen_s", 0.0) >= frozen_s:
        return (
            f"rank {rank}: did not run for {status['frozen_s']:.1f}s before it answered "
            f"(stopped, swapped out, or in a call that held the GIL)"
        )
    if status["state"] == "paused":
        return f"rank {rank}: its caller has not stepped the engine for {status['seconds']:.1f}s"
    if status["state"] == "waiting":
        return f"rank {rank}: waiting {status['seconds']:.1f}s for {status['for']}"
    return f"rank {rank}: busy for {status['seconds']:.1f}s without progress"


def stalled_ranks(
    statuses: dict[int, dict | None], timeout_s: float, frozen_threshold_s: float
) -> list[int] | None:
    """The verdict on every rank's status (None: no answer): the ranks to name as
    stalled; [] when rank 0's caller is paused (not a stall, only noted); None when
    some rank is still working (not a stall)."""
    # a rank that cannot answer, or could not for a while, is frozen, whoever is paused
    frozen = [
        rank
        for rank, status in statuses.items()
        if status is None or status["frozen_s"] >= frozen_threshold_s
    ]
    if frozen:
        return sorted(frozen)
    if any(status["state"] == "paused" for status in statuses.values()):
        return []
    busy = [
        rank
        for rank, status in statuses.items()
        if status["state"] == "busy" and status["seconds"] >= timeout_s
    ]
    if busy:
        return sorted(busy)
    if all(status["state"] == "waiting" for status in statuses.values()):
        return sorted(statuses)  # everyone waits on someone: a circular wait
    return None


class Watchdog:
    def __init__(
        self,
        comm: pkl5.Intracomm,
        info: RankInfo,
        tracker: WaitTracker,
        has_work: Callable[[], bool],
        timeout_s: float,
        rank_stats: RankStatsExchange | None = None,
    ) -> None:
        self.comm = comm
        self.rank_stats = rank_stats  # its messages ride this thread's ticks
        self.info = info
        self.tracker = tracker
        self.has_work = has_work
        self.timeout_s = timeout_s
        self.reply_window_s = reply_window(timeout_s)
        self.frozen_threshold_s = frozen_threshold(timeout_s)
        self._frozen_s = 0.0  # how long this thread did not run before its latest wake-up
        self._rounds = itertools.count()
        self._stop = threading.Event()
        self._quiet_until = 0.0  # after a diagnosis that found no stall, look again later
        self._thread = threading.Thread(
            target=self._run, name=f"ppruntime-watchdog-{info.rank}", daemon=True
        )

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        period = min(1.0, self.timeout_s / 4)
        woke_at = time.monotonic()
        while not self._stop.wait(period):
            now = time.monotonic()
            self._frozen_s = max(0.0, now - woke_at - period)
            woke_at = now
            self._answer_dump_requests()
            if self.rank_stats is not None:
                self.rank_stats.tick()
            now = time.monotonic()
            stalled = self.has_work() and self.tracker.idle_seconds(now) > self.timeout_s
            if stalled and now >= self._quiet_until:
                self._diagnose_and_abort(now)

    def _dump_own_stacks(self, reason: str) -> None:
        sys.stderr.write(f"{self.info.prefix} watchdog: {reason}; stacks of this rank:\n")
        sys.stderr.flush()
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        sys.stderr.flush()

    def _answer_dump_requests(self) -> None:
        status = MPI.Status()
        while True:
            message = self.comm.improbe(MPI.ANY_SOURCE, Tag.WATCHDOG_DUMP, status)
            if message is None:
                return
            requester = status.Get_source()
            round_id = message.recv()
            reply = _status(self.tracker, time.monotonic(), self._frozen_s)
            if reply["state"] != "paused":
                self._dump_own_stacks(f"stack dump requested by rank {requester}")
            request = self.comm.isend((round_id, reply), requester, Tag.WATCHDOG_REPLY)
            deadline = time.monotonic() + self.reply_window_s
            while not request_done(request) and time.monotonic() < deadline:
                time.sleep(0.01)

    def _collect_statuses(self) -> dict[int, dict | None]:
        """Every other rank's status, None for those that do not answer in the window."""
        round_id = (self.info.rank, next(self._rounds))
        others = [rank for rank in range(self.info.size) if rank != self.info.rank]
        requests = [self.comm.isend(round_id, rank, Tag.WATCHDOG_DUMP) for rank in others]
        statuses: dict[int, dict | None] = {rank: None for rank in others}
        deadline = time.monotonic() + self.reply_window_s
        probe_status = MPI.Status()
        while time.monotonic() < deadline and any(statuses[r] is None for r in others):
            self._answer_dump_requests()  # another rank may be diagnosing at the same time
            message = self.comm.improbe(MPI.ANY_SOURCE, Tag.WATCHDOG_REPLY, probe_status)
            if message is None:
                time.sleep(0.02)
                continue
            answered_round, status = message.recv()
            if answered_round == round_id:  # not a late answer to an earlier round
                statuses[probe_status.Get_source()] = status
        del requests  # a rank that never answers never takes its request either
        return statuses

    def _diagnose_and_abort(self, now: float) -> None:
        """Ask every rank for its state; abort for a silent rank or a real stall."""
        progress_before = self.tracker.progress_count
        mine = _status(self.tracker, now, self._frozen_s)
        statuses = self._collect_statuses()
        statuses[self.info.rank] = mine
        self._quiet_until = time.monotonic() + self.timeout_s
        if self.tracker.progress_count != progress_before:
            return  # this rank moved on while asking: whatever held it is gone
        stalled = stalled_ranks(statuses, self.timeout_s, self.frozen_threshold_s)
        if stalled is None:
            return  # some rank is working (and not for long): not a stall
        if not stalled:
            # not a stall: the driver's caller is doing something else between steps
            paused = [r for r, status in statuses.items() if status["state"] == "paused"]
            sys.stderr.write(
                f"{self.info.prefix} watchdog: waiting on rank {paused[0]}, whose caller "
                f"has not stepped the engine for a while; not aborting\n"
            )
            return
        window, frozen = self.reply_window_s, self.frozen_threshold_s
        self._dump_own_stacks(
            f"no progress for {self.timeout_s:.0f}s ({describe(self.info.rank, mine, window)})"
        )
        summary = "; ".join(
            describe(rank, statuses[rank], window, frozen) for rank in sorted(statuses)
        )
        report_and_abort(
            self.info,
            f"watchdog: the pipeline made no progress for {self.timeout_s:.0f}s; "
            f"stalled rank(s): {', '.join(map(str, sorted(stalled)))} ({summary})",
        )

"""The watchdog: a stall becomes every live rank's stack dump and an abort, never silence.

Each rank runs a watchdog thread with its own communicator. When this rank has work
in flight but has made no progress for `timeout_s` (waiting on a message that does
not come, or stuck inside a step; rank 0's clock stands still while its caller holds
it between steps), it asks every other rank for its state and stacks
(WATCHDOG_DUMP) and waits `reply_window(timeout_s)` for the answers. A rank that
does not answer in that window is itself the stalled rank (stopped, swapped out,
stuck in a call that holds the GIL, or on a lost node): the diagnosis never waits
on it. The live ranks' stacks are printed, one line names the stalled rank(s) and
why, and the job aborts. So any frozen rank, at any position, ends the job within
about timeout_s + 1 s (polling) + reply_window(timeout_s) of the last progress of
the rank that notices.
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

MIN_REPLY_WINDOW_S = 5.0
MAX_REPLY_WINDOW_S = 30.0


def reply_window(timeout_s: float) -> float:
    """How long a diagnosis waits for the other ranks' answers: the timeout itself,
    but at least 5 s (a loaded machine) and at most 30 s."""
    return min(max(timeout_s, MIN_REPLY_WINDOW_S), MAX_REPLY_WINDOW_S)


def _status(tracker: WaitTracker, now: float) -> dict:
    if tracker.paused:
        return {"state": "paused", "seconds": now - tracker.paused_at}
    if tracker.waiting_for is not None:
        return {"state": "waiting", "for": tracker.waiting_for, "seconds": now - tracker.since}
    return {"state": "busy", "seconds": now - tracker.progress_at}


def describe(rank: int, status: dict | None, window_s: float = MIN_REPLY_WINDOW_S) -> str:
    if status is None:
        return (
            f"rank {rank}: no answer within {window_s:.0f}s (stopped, stuck in a call "
            f"that holds the GIL, or its node is lost)"
        )
    if status["state"] == "paused":
        return f"rank {rank}: its caller has not stepped the engine for {status['seconds']:.1f}s"
    if status["state"] == "waiting":
        return f"rank {rank}: waiting {status['seconds']:.1f}s for {status['for']}"
    return f"rank {rank}: busy for {status['seconds']:.1f}s without progress"


class Watchdog:
    def __init__(
        self,
        comm: pkl5.Intracomm,
        info: RankInfo,
        tracker: WaitTracker,
        has_work: Callable[[], bool],
        timeout_s: float,
    ) -> None:
        self.comm = comm
        self.info = info
        self.tracker = tracker
        self.has_work = has_work
        self.timeout_s = timeout_s
        self.reply_window_s = reply_window(timeout_s)
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
        while not self._stop.wait(period):
            self._answer_dump_requests()
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
            reply = _status(self.tracker, time.monotonic())
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
        mine = _status(self.tracker, now)
        statuses = self._collect_statuses()
        statuses[self.info.rank] = mine
        self._quiet_until = time.monotonic() + self.timeout_s
        if self.tracker.progress_count != progress_before:
            return  # this rank moved on while asking: whatever held it is gone
        silent = [rank for rank, status in statuses.items() if status is None]
        stalled = silent  # a rank that cannot answer is frozen, whoever else is paused
        if not stalled:
            paused = [r for r, status in statuses.items() if status["state"] == "paused"]
            if paused:
                # not a stall: the driver's caller is doing something else between steps
                sys.stderr.write(
                    f"{self.info.prefix} watchdog: waiting on rank {paused[0]}, whose caller "
                    f"has not stepped the engine for a while; not aborting\n"
                )
                return
            stalled = [
                rank
                for rank, status in statuses.items()
                if status["state"] == "busy" and status["seconds"] >= self.timeout_s
            ]
        if not stalled:
            if not all(s["state"] == "waiting" for s in statuses.values()):
                return  # some rank is working (and not for long): not a stall
            stalled = sorted(statuses)  # everyone waits on someone: a circular wait
        window = self.reply_window_s
        self._dump_own_stacks(
            f"no progress for {self.timeout_s:.0f}s ({describe(self.info.rank, mine, window)})"
        )
        summary = "; ".join(describe(rank, statuses[rank], window) for rank in sorted(statuses))
        report_and_abort(
            self.info,
            f"watchdog: the pipeline made no progress for {self.timeout_s:.0f}s; "
            f"stalled rank(s): {', '.join(map(str, sorted(stalled)))} ({summary})",
        )

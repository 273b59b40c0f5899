"""The watchdog: a stall becomes every rank's stack dump and an abort, never silence.

Each rank runs a watchdog thread with its own communicator. When this rank has work
in flight but has made no progress for `timeout_s` (waiting on a message that does
not come, or stuck inside a step), it prints its own stacks, asks every other rank
for theirs (WATCHDOG_DUMP), collects their status for a few seconds, names the
stalled rank(s) (busy rather than waiting, or not answering) and aborts the job.
"""

from __future__ import annotations

import faulthandler
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

REPLY_WINDOW_S = 5.0


def _status(tracker: WaitTracker, now: float) -> dict:
    if tracker.paused:
        return {"state": "paused", "seconds": now - tracker.progress_at}
    if tracker.waiting_for is not None:
        return {"state": "waiting", "for": tracker.waiting_for, "seconds": now - tracker.since}
    return {"state": "busy", "seconds": now - tracker.progress_at}


def describe(rank: int, status: dict | None) -> str:
    if status is None:
        return f"rank {rank}: no answer"
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
        self._stop = threading.Event()
        self._quiet_until = 0.0  # after finding rank 0's caller paused, look again later
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
            idle_for = now - max(self.tracker.progress_at, self.tracker.since)
            stalled = self.has_work() and idle_for > self.timeout_s and not self.tracker.paused
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
            message.recv()
            reply = _status(self.tracker, time.monotonic())
            if reply["state"] != "paused":
                self._dump_own_stacks(f"stack dump requested by rank {requester}")
            request = self.comm.isend(reply, requester, Tag.WATCHDOG_REPLY)
            deadline = time.monotonic() + REPLY_WINDOW_S
            while not request_done(request) and time.monotonic() < deadline:
                time.sleep(0.01)

    def _diagnose_and_abort(self, now: float) -> None:
        """Ask every rank for its state; abort only for a real stall."""
        progress_before = self.tracker.progress_at
        mine = _status(self.tracker, now)
        others = [rank for rank in range(self.info.size) if rank != self.info.rank]
        requests = [self.comm.isend("dump", rank, Tag.WATCHDOG_DUMP) for rank in others]
        statuses: dict[int, dict | None] = {rank: None for rank in others}
        statuses[self.info.rank] = mine
        deadline = time.monotonic() + REPLY_WINDOW_S
        probe_status = MPI.Status()
        while time.monotonic() < deadline and any(statuses[r] is None for r in others):
            self._answer_dump_requests()
            message = self.comm.improbe(MPI.ANY_SOURCE, Tag.WATCHDOG_REPLY, probe_status)
            if message is None:
                time.sleep(0.02)
                continue
            statuses[probe_status.Get_source()] = message.recv()
        del requests
        self._quiet_until = time.monotonic() + self.timeout_s
        if self.tracker.progress_at != progress_before:
            return  # this rank moved on while asking: whatever held it is gone
        paused = [r for r, status in statuses.items() if status and status["state"] == "paused"]
        if paused:
            # not a stall: the driver's caller is doing something else between steps
            sys.stderr.write(
                f"{self.info.prefix} watchdog: waiting on rank {paused[0]}, whose caller has "
                f"not stepped the engine for a while; not aborting\n"
            )
            return
        stalled = [
            rank
            for rank, status in statuses.items()
            if status is None or (status["state"] == "busy" and status["seconds"] >= self.timeout_s)
        ]
        if not stalled:
            if not all(s["state"] == "waiting" for s in statuses.values()):
                return  # some rank is working (and not for long): not a stall
            stalled = sorted(statuses)  # everyone waits on someone: a circular wait
        self._dump_own_stacks(
            f"no progress for {self.timeout_s:.0f}s ({describe(self.info.rank, mine)})"
        )
        summary = "; ".join(describe(rank, statuses[rank]) for rank in sorted(statuses))
        report_and_abort(
            self.info,
            f"watchdog: the pipeline made no progress for {self.timeout_s:.0f}s; "
            f"stalled rank(s): {', '.join(map(str, stalled))} ({summary})",
        )

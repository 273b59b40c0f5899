"""Every rank's busy time and counters, brought to rank 0 off the hot path (for `GET
/metrics`, `LLM.rank_counters()` and bench_serve.py's per-rank table).

Ranks > 0 send rank 0 a few float64 words, (final flag, start time, now, seconds in the
stage's forward so far, then the COUNTERS in their order), once per tick of their
watchdog thread (about a second), on the watchdog communicator with its own tag; rank
0's watchdog thread takes what has arrived on each of its ticks and keeps each rank's
latest. No executor thread sends, receives or waits for these messages. The times are
the sending rank's own clock: a busy fraction is a difference of two reports of one
rank, so clocks of different hosts never mix.

At shutdown (after the watchdog threads have stopped, so the main thread owns the
communicator) each rank > 0 sends one final report and rank 0 receives until it has
every rank's final one: no message is left unreceived when the communicator is freed.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np
from mpi4py import MPI

from ppruntime.comm.tags import Tag
from ppruntime.comm.waiting import Backoff
from ppruntime.engine.busy_report import BusyReport
from ppruntime.logs import get_logger

log = get_logger("rank-stats")

# The executor spans whose CPU and wall seconds travel (engine/executor.py names them)
SPANS = (
    "forward",
    "sample",
    "schedule",
    "handle",
    "relay",
    "relay-wait",
    "receive-wait",
    "send",
    "send-wait",
    "idle",
    "launch",
    "complete",
    "outputs",  # LLM: a step's outputs to the calls that wait for them
    "link-in",  # ppruntime serve: the HTTP process's messages read and applied
    "deltas-out",  # ppruntime serve: a step's deltas to the HTTP process
)
# A rank's cumulative counters, in the order they travel: the executor's (ExecutorStats),
# its polled waits' sleeps (comm/waiting.py), the CPU seconds of the thread that runs the
# executor and of the whole process, that thread's context switches (Linux), then each
# span's CPU ("cpu:NAME") and wall ("wall:NAME") seconds.
COUNTERS = (
    "iterations",
    "batches",
    "tokens_computed",
    "seqs",
    "decode_batches",
    "decode_seqs",
    "empty_iterations",
    "idle_waits",
    "poll_sleeps",
    "background_sleeps",
    "thread_cpu_s",
    "process_cpu_s",
    "voluntary_switches",
    "involuntary_switches",
    *(f"cpu:{span}" for span in SPANS),
    *(f"wall:{span}" for span in SPANS),
)
_HEAD = 4  # final flag, started, now, busy seconds
_FINAL, _STARTED, _NOW, _BUSY = range(_HEAD)
_WORDS = _HEAD + len(COUNTERS)


class RankStatsExchange:
    """One rank's side of the exchange. `tick()` runs on the watchdog thread only;
    `finish()` on the main thread after that thread has stopped; `latest()` anywhere."""

    def __init__(
        self,
        comm: MPI.Comm,
        busy_seconds: Callable[[], float],
        counters: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self._busy_seconds = busy_seconds  # read on the watchdog thread
        self._counters = counters  # also (the names of COUNTERS; others are not sent)
        self._started = time.monotonic()
        self._latest: dict[int, BusyReport] = {}
        self._lock = threading.Lock()
        self._sends: list[tuple[MPI.Request, np.ndarray]] = []
        self._inbox = np.zeros(_WORDS, dtype=np.float64)
        self._finished_ranks: set[int] = set()

    def own_report(self) -> BusyReport:
        counters = {} if self._counters is None else self._counters()
        return BusyReport(self._started, time.monotonic(), self._busy_seconds(), counters)

    def latest(self) -> dict[int, BusyReport]:
        """Rank 0: every rank's newest report, this rank's own taken now."""
        with self._lock:
            reports = dict(self._latest)
        reports[self.rank] = self.own_report()
        return reports

    def tick(self) -> None:
        """Send this rank's report (ranks > 0) or take the ones that arrived (rank 0)."""
        if self.size == 1:
            return
        if self.rank == 0:
            self._receive_arrived()
        else:
            self._send(final=False)

    def finish(self, timeout_s: float) -> None:
        """Shutdown, main thread, watchdog thread stopped: the final reports, every one
        received on rank 0 (given up after `timeout_s`, with a warning)."""
        if self.size == 1:
            return
        deadline = time.monotonic() + timeout_s
        backoff = Backoff()
        if self.rank == 0:
            while len(self._finished_ranks) < self.size - 1:
                if not self._receive_arrived():
                    if time.monotonic() >= deadline:
                        missing = sorted(set(range(1, self.size)) - self._finished_ranks)
                        log.warning("no final busy report from ranks %s at shutdown", missing)
                        return
                    backoff.sleep()
            return
        self._send(final=True)
        while self._sends:
            self._reap_sends()
            if time.monotonic() >= deadline:
                log.warning("rank 0 did not take this rank's final busy report at shutdown")
                return
            backoff.sleep()

    def _send(self, final: bool) -> None:
        self._reap_sends()
        report = self.own_report()
        message = np.zeros(_WORDS, dtype=np.float64)
        message[:_HEAD] = (float(final), report.started, report.now, report.busy_s)
        message[_HEAD:] = [float(report.counters.get(name, 0.0)) for name in COUNTERS]
        request = self.comm.Isend([message, MPI.DOUBLE], 0, Tag.RANK_STATS)
        self._sends.append((request, message))

    def _reap_sends(self) -> None:
        self._sends = [(request, buffer) for request, buffer in self._sends if not request.Test()]

    def _receive_arrived(self) -> bool:
        """Take every report that has arrived; whether there was any."""
        status = MPI.Status()
        took = False
        while True:
            message = self.comm.Improbe(MPI.ANY_SOURCE, Tag.RANK_STATS, status)
            if message is None:
                return took
            took = True
            message.Recv([self._inbox, MPI.DOUBLE])
            words = self._inbox.tolist()
            source = status.Get_source()
            with self._lock:
                counters = dict(zip(COUNTERS, words[_HEAD:]))
                report = BusyReport(words[_STARTED], words[_NOW], words[_BUSY], counters)
                self._latest[source] = report
            if words[_FINAL]:
                self._finished_ranks.add(source)

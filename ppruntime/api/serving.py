"""Drives one engine for an HTTP server: requests in from the event loop, deltas out.

The engine is stepped by one thread (the process's main thread; MPI and the signal
handlers live there). The server's event loop hands it requests and cancellations
through a queue. Deltas go back through one `DeltaOutbox` per event loop: an engine
step appends every request's new tokens to it and wakes the loop once, and not at
all while the loop has not drained the previous wake-up (a loop that is behind gets
the later steps' tokens in the same drain). The engine thread thus pays one list
append per step, not one cross-thread call per request per token. When nothing is
running, the engine thread blocks on the queue instead of spinning.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from ppruntime.engine.outputs import RequestOutput
from ppruntime.engine.sampling_params import SamplingParams
from ppruntime.logs import get_logger

log = get_logger("serve")

IDLE_WAIT_S = 0.05

Deliver = Callable[[list[RequestOutput]], None]  # runs on the server's event loop


class DeltaOutbox:
    """Deltas from the engine thread to one event loop, batched per wake-up and paced.

    `put` (engine thread) appends, and schedules one `deliver` call on the loop unless
    one is already scheduled, or the loop is resting: each batch the loop handles for
    `burst` seconds adds `burst * (1 - share) / share` seconds of rest, so the HTTP
    side (which shares the GIL with the engine thread) takes at most about `share` of
    the process's time however many streams there are; the tokens of the steps in
    between go out in the next batch, several to a chunk. A request with a first token
    or a finish (its id in `urgent`) wakes the loop at once, so time to first token and
    the next request's admission do not wait; during a rest such a wake-up delivers
    only those requests' deltas. Each request's deltas are delivered in order.
    `flush_due` (engine thread, every iteration) sends what waited once the rest is over.
    """

    def __init__(self, loop, deliver: Deliver, share: float = 0.2) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"the HTTP time share must be in (0, 1], got {share}")
        self._loop = loop
        self._deliver = deliver
        self._rest_factor = (1 - share) / share
        self._lock = threading.Lock()
        self._pending: list[RequestOutput] = []
        self._urgent: set[str] = set()
        self._scheduled = False
        self._resting_until = 0.0  # monotonic; written by the loop, read by the engine
        self.wakeups = 0  # loop wake-ups asked for (statistics, tests)

    def put(self, deltas: list[RequestOutput], urgent: set[str] | None = None) -> None:
        with self._lock:
            self._pending.extend(deltas)
            if urgent:
                self._urgent |= urgent
        self._wake(bool(urgent))

    def flush_due(self) -> None:
        if self._pending and not self._scheduled and time.monotonic() >= self._resting_until:
            self._wake(False)

    def burst_ended(self, seconds: float) -> None:
        """The loop spent `seconds` on the last batch (called on the loop)."""
        now = time.monotonic()
        self._resting_until = max(self._resting_until, now) + seconds * self._rest_factor

    def _wake(self, urgent: bool) -> None:
        with self._lock:
            if self._scheduled or not self._pending:
                return
            if not urgent and time.monotonic() < self._resting_until:
                return
            self._scheduled = True
            self.wakeups += 1
        with contextlib.suppress(RuntimeError):  # a closed loop (server stopping)
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            urgent, self._urgent = self._urgent, set()
            self._scheduled = False
            if urgent and time.monotonic() < self._resting_until:
                batch = [delta for delta in self._pending if delta.request_id in urgent]
                self._pending = [d for d in self._pending if d.request_id not in urgent]
            else:
                batch, self._pending = self._pending, []
        if batch:
            self._deliver(batch)


@dataclass
class _Submit:
    request_id: str
    prompt_ids: np.ndarray
    params: SamplingParams
    outbox: DeltaOutbox


@dataclass
class _Abort:
    request_id: str


@dataclass
class ServingStats:
    """Live figures for /metrics, written by the engine thread (plain reads elsewhere)."""

    running: int = 0
    waiting: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    generated_tokens: int = 0
    requests_finished: int = 0
    busy_s: float = 0.0
    rank_busy: dict = field(default_factory=dict)  # rank -> engine.rank_stats.BusyReport
    started: float = field(default_factory=time.monotonic)
    # finished-request latencies not yet moved into the histograms
    ttft_s: list[float] = field(default_factory=list)
    itl_s: list[float] = field(default_factory=list)


class EngineDriver:
    """Rank 0's engine, driven from the thread that calls `run()`."""

    def __init__(self, llm, max_waiting: int) -> None:
        self.llm = llm
        self.max_waiting = max_waiting
        self.capacity = llm.config.max_batch_size * llm.config.parallel.microbatch_slots
        self.stats = ServingStats()
        self.stop_requested = threading.Event()
        self.stopped = threading.Event()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._outstanding = 0  # accepted and not finished (any thread)
        self._routes: dict[str, DeltaOutbox] = {}  # engine thread only
        self._outboxes: dict[int, DeltaOutbox] = {}  # every one seen (one per server loop)
        self._last_token_time: dict[str, float] = {}
        self._submitted_at: dict[str, float] = {}
        self._ids = 0

    # -- the event loop's side ------------------------------------------------------------
    @property
    def accepting(self) -> bool:
        return not self.stop_requested.is_set()

    def reserve(self, count: int) -> bool:
        """Room for `count` more requests in the bounded waiting queue (then counted)."""
        with self._lock:
            waiting = max(self._outstanding + count - self.capacity, 0)
            if waiting > self.max_waiting or not self.accepting:
                return False
            self._outstanding += count
            return True

    def release(self, count: int) -> None:
        """Give back reserved room that was not used (a request refused after reserve)."""
        with self._lock:
            self._outstanding -= count

    def new_request_id(self, prefix: str) -> str:
        with self._lock:
            self._ids += 1
            return f"{prefix}-{self._ids}"

    def submit(self, request_id: str, prompt_ids, params, outbox: DeltaOutbox) -> None:
        """Queue a request; its deltas (then one with `finished`) go to `outbox`."""
        self._commands.put(_Submit(request_id, prompt_ids, params, outbox))

    def abort(self, request_id: str) -> None:
        self._commands.put(_Abort(request_id))

    # -- the engine thread --------------------------------------------------------------------
    def run(self, grace_s: float) -> None:
        """Step the engine until a stop is requested and what runs has ended.

        After a stop request, running requests get `grace_s` seconds to finish; the rest
        are aborted (their clients get finish_reason "abort").
        """
        llm = self.llm
        deadline = None
        while True:
            self._apply_commands(block=not llm.has_unfinished() and deadline is None)
            if self.stop_requested.is_set() and deadline is None:
                deadline = time.monotonic() + grace_s
                log.info("stopping: %d request(s) get %.1f s to finish", len(self._routes), grace_s)
            if deadline is not None and time.monotonic() >= deadline:
                for request_id in list(self._routes):
                    llm.abort(request_id)
                deadline = float("inf")  # aborted once; drain what is left
            if llm.has_unfinished():
                _, deltas = llm.step()
                self._dispatch(deltas)
            elif deadline is not None:
                break
            for outbox in self._outboxes.values():
                outbox.flush_due()
            self._update_stats()  # idle too: the other ranks' reports keep coming
        self.stopped.set()

    def _apply_commands(self, block: bool) -> None:
        try:
            command = self._commands.get(timeout=IDLE_WAIT_S) if block else None
        except queue.Empty:
            return
        while True:
            if command is None:
                try:
                    command = self._commands.get_nowait()
                except queue.Empty:
                    return
            self._apply(command)
            command = None

    def _apply(self, command) -> None:
        if isinstance(command, _Abort):
            if command.request_id in self._routes:
                self.llm.abort(command.request_id)
            return
        try:
            self.llm.add_request(
                command.prompt_ids, command.params, request_id=command.request_id, stream=True
            )
        except Exception as error:  # validated in the handler already; report, go on
            self.release(1)
            failure = RequestOutput(command.request_id, [], [], "", finish_reason="error")
            failure.finished = True
            failure.error = str(error)
            command.outbox.put([failure], urgent={command.request_id})
            return
        self._routes[command.request_id] = command.outbox
        self._outboxes[id(command.outbox)] = command.outbox
        self._submitted_at[command.request_id] = time.monotonic()

    def _dispatch(self, deltas: list[RequestOutput]) -> None:
        if not deltas:
            return
        now = time.monotonic()
        by_outbox: dict[int, tuple[DeltaOutbox, list[RequestOutput], set[str]]] = {}
        stats = self.stats
        finished = 0
        for delta in deltas:
            outbox = self._routes.get(delta.request_id)
            if outbox is None:
                continue
            key = id(outbox)
            if key not in by_outbox:
                by_outbox[key] = (outbox, [], set())
            entry = by_outbox[key]
            entry[1].append(delta)
            if delta.token_ids:
                stats.generated_tokens += len(delta.token_ids)
                last = self._last_token_time.get(delta.request_id)
                if last is None:
                    stats.ttft_s.append(now - self._submitted_at[delta.request_id])
                    entry[2].add(delta.request_id)  # a first token: no pacing
                else:
                    stats.itl_s.append((now - last) / len(delta.token_ids))
                self._last_token_time[delta.request_id] = now
            if delta.finished:
                entry[2].add(delta.request_id)
                finished += 1
                del self._routes[delta.request_id]
                self._last_token_time.pop(delta.request_id, None)
                self._submitted_at.pop(delta.request_id, None)
        if finished:
            stats.requests_finished += finished
            self.release(finished)
        for outbox, batch, urgent in by_outbox.values():
            outbox.put(batch, urgent)

    def _update_stats(self) -> None:
        state = self.llm.engine_state()
        stats = self.stats
        stats.running = state["running"]
        stats.waiting = state["waiting"]
        stats.kv_blocks_used = state["kv_blocks_used"]
        stats.kv_blocks_total = state["kv_blocks_total"]
        stats.busy_s = state["busy_s"]
        stats.rank_busy = state["rank_busy"]

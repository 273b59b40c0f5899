"""Drives rank 0's engine for the HTTP process: requests in, deltas out, over one link.

The engine is stepped by the process's main thread (MPI and the signal handlers live
there); HTTP runs in its own process (`http_process.py`), so nothing here shares a GIL
with a request handler. Each iteration reads what the HTTP process sent (submits,
aborts, a request for the figures of /metrics) without waiting while requests run, steps
the engine once and sends that step's deltas as one frame. When nothing runs it waits on
the link instead of spinning. A HTTP process that is behind simply finds several steps'
frames when it next reads; the engine never waits for it (see `EngineLink`).
"""

from __future__ import annotations

import time

from ppruntime.api.http_link import EngineLink, LinkError, delta_to_wire, params_from_wire
from ppruntime.api.server_metrics import LatencyCounts
from ppruntime.engine.outputs import RequestOutput
from ppruntime.logs import get_logger

log = get_logger("serve")

IDLE_WAIT_S = 0.05


class EngineDriver:
    """Rank 0's engine, driven from the thread that calls `run()`."""

    def __init__(self, llm, link: EngineLink) -> None:
        self.llm = llm
        self.link = link
        self.stop_requested = False  # set by the signal handler
        self._running: set[str] = set()  # submitted and not finished
        self._last_token_time: dict[str, float] = {}
        self._submitted_at: dict[str, float] = {}
        self._aborted_all = False
        self._generated_tokens = 0
        self._finished = 0
        self._ttft = LatencyCounts()  # since start-up; bounded (bucket counts)
        self._itl = LatencyCounts()

    def run(self, grace_s: float) -> str | None:
        """Step the engine until a stop is requested and what runs has ended.

        After a stop request, running requests get `grace_s` seconds to finish; the rest
        are aborted (their clients get finish_reason "abort"). Returns None, or why the
        serving ended early (the HTTP process went away: what ran is aborted first).
        """
        llm, link = self.llm, self.link
        span = llm.tracer.span
        deadline = None
        failure = None
        while True:
            idle = not llm.has_unfinished() and deadline is None and failure is None
            if idle:
                messages = link.receive(IDLE_WAIT_S)
            else:
                with span("link-in"):
                    messages = link.receive(0.0)
            if messages is None and failure is None:
                failure = "the HTTP process exited"
                self._abort_all()
            if messages:
                with span("link-in"):
                    for message in messages:
                        self._apply(message)
            if self.stop_requested and deadline is None:
                deadline = time.monotonic() + grace_s
                link.send([["stopping"]])
                running = len(self._running)
                log.info("stopping: %d request(s) get %.1f s to finish", running, grace_s)
            if deadline is not None and time.monotonic() >= deadline:
                self._abort_all()
                deadline = float("inf")  # aborted once; drain what is left
            if llm.has_unfinished():
                _, deltas = llm.step()
                with span("deltas-out"):
                    self._send(deltas)
            elif deadline is not None or failure is not None:
                return failure

    def _abort_all(self) -> None:
        self._aborted_all = True
        for request_id in list(self._running):
            self.llm.abort(request_id)

    def _apply(self, message: list) -> None:
        kind = message[0]
        if kind == "submit":
            self._submit(message)
        elif kind == "abort":
            if message[1] in self._running:
                self.llm.abort(message[1])
        elif kind == "stats":
            self.link.send([["stats", self._figures()]])
        else:
            log.warning("ignoring a message from the HTTP process: %.200r", message)

    def _submit(self, message: list) -> None:
        request_id = message[1]
        try:
            if len(message) != 4 or not isinstance(request_id, str):
                raise LinkError(f"a malformed submit message: {message!r:.200}")
            if self._aborted_all:
                raise RuntimeError("the server is shutting down")
            params = params_from_wire(message[3])
            self.llm.add_request(message[2], params, request_id=request_id, stream=True)
        except Exception as error:  # validated in the HTTP process already; report, go on
            failure = RequestOutput(str(request_id), [], [], "", finish_reason="error")
            failure.finished = True
            failure.error = str(error)
            self.link.send([["deltas", [delta_to_wire(failure)]]])
            return
        self._running.add(request_id)
        self._submitted_at[request_id] = time.monotonic()

    def _send(self, deltas: list[RequestOutput]) -> None:
        if not deltas:
            return
        now = time.monotonic()
        running = self._running
        last_token_time = self._last_token_time
        wire = []
        generated = 0
        for delta in deltas:
            request_id = delta.request_id
            if request_id not in running:
                continue
            wire.append(delta_to_wire(delta))
            tokens = len(delta.token_ids)
            if tokens:
                generated += tokens
                last = last_token_time.get(request_id)
                if last is None:
                    self._ttft.observe(now - self._submitted_at[request_id])
                else:  # one inter-token gap a token
                    self._itl.observe((now - last) / tokens, tokens)
                last_token_time[request_id] = now
            if delta.finished:
                self._finished += 1
                running.discard(request_id)
                self._last_token_time.pop(request_id, None)
                self._submitted_at.pop(request_id, None)
        self._generated_tokens += generated
        if wire:
            self.link.send([["deltas", wire]])

    def _figures(self) -> dict:
        """The figures of /metrics (`server_metrics.ServingStats`)."""
        state = self.llm.engine_state()
        return {
            "running": state["running"],
            "waiting": state["waiting"],
            "kv_blocks_used": state["kv_blocks_used"],
            "kv_blocks_total": state["kv_blocks_total"],
            "busy_s": state["busy_s"],
            "rank_busy": {
                str(rank): [report.started, report.now, report.busy_s, report.counters]
                for rank, report in state["rank_busy"].items()
            },
            "generated_tokens": self._generated_tokens,
            "requests_finished": self._finished,
            "ttft": self._ttft.to_wire(),
            "itl": self._itl.to_wire(),
        }

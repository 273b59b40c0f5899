"""Rank 0's book of requests: ids, what is queued for the pipeline, and their outputs.

The API side of the executor (`LLM.add_request`, `abort`, the outputs a step returns)
goes through this book; the executor takes the queued new requests and cancellations
from it once an iteration, as the control message every rank applies, and tells it
when sequences gain tokens and finish. Pure bookkeeping: no MPI, no device.
"""

from __future__ import annotations

import time

import numpy as np

from ppruntime.engine.control import Control, NewRequests
from ppruntime.engine.errors import InvalidRequestError
from ppruntime.engine.outputs import OutputCollector, RequestOutput
from ppruntime.engine.seq_table import SeqInfo


class RequestBook:
    """Every unfinished request of rank 0 by id, and what it waits to send or return."""

    def __init__(self, outputs: OutputCollector) -> None:
        self.outputs = outputs
        self._new_requests: list[SeqInfo] = []
        self._aborts: list[int] = []  # seq ids whose cancellation is not sent yet
        self._next_seq_id = 0
        self._seq_by_request: dict[str, int] = {}
        self._aborting: set[str] = set()  # request ids whose abort is queued or applied
        self._events: list[RequestOutput] = []
        self._finished: list[RequestOutput] = []

    def add(self, request_id: str, prompt_token_ids: np.ndarray, params, stream: bool) -> None:
        if request_id in self._seq_by_request:
            raise InvalidRequestError(f"request_id {request_id!r} is already in use")
        info = SeqInfo(self._next_seq_id, request_id, prompt_token_ids, params)
        self._next_seq_id += 1
        self._seq_by_request[request_id] = info.seq_id
        self.outputs.add(info, stream, time.monotonic())
        self._new_requests.append(info)

    def abort(self, request_id: str) -> bool:
        """Queue the cancellation of an unfinished request; False if there is none to
        cancel (unknown, finished, or already being aborted)."""
        seq_id = self._seq_by_request.get(request_id)
        if seq_id is None or request_id in self._aborting:
            return False
        self._aborting.add(request_id)
        self._aborts.append(seq_id)
        return True

    def abort_all(self) -> None:
        for request_id in list(self._seq_by_request):
            self.abort(request_id)

    def has(self, request_id: str) -> bool:
        """Whether `request_id` is in use by an unfinished request."""
        return request_id in self._seq_by_request

    def seq_id_of(self, request_id: str) -> int:
        return self._seq_by_request[request_id]

    @property
    def num_unfinished(self) -> int:
        return len(self._seq_by_request)

    @property
    def has_control(self) -> bool:
        """New requests or cancellations wait to be sent down the pipeline."""
        return bool(self._new_requests or self._aborts)

    def take_control(self) -> tuple[Control | None, list[SeqInfo]]:
        """The queued new requests and cancellations as one control message (None when
        there are none), and the new requests' infos; the queues are emptied."""
        if not self.has_control:
            return None, []
        new = None
        infos = self._new_requests
        if infos:
            lengths = np.array([i.prompt_token_ids.shape[0] for i in infos], dtype=np.int64)
            new = NewRequests(
                seq_ids=np.array([i.seq_id for i in infos], dtype=np.int64),
                request_ids=[i.request_id for i in infos],
                prompt_lengths=lengths,
                prompt_tokens=(
                    infos[0].prompt_token_ids
                    if len(infos) == 1
                    else np.concatenate([i.prompt_token_ids for i in infos])
                ),
                params=[i.params for i in infos],
            )
        control = Control(new=new, aborts=self._aborts)
        self._new_requests, self._aborts = [], []
        return control, infos

    def on_admit(self, info: SeqInfo) -> None:
        self.outputs.on_admit(info)

    def on_batch(self, gained, diff) -> None:
        """Sequences gained tokens (a landed batch): their stream deltas."""
        self._events.extend(self.outputs.on_batch(gained, diff))

    def on_finish(self, info: SeqInfo, code: int) -> None:
        output, last_delta = self.outputs.finish(info, code)
        self._finished.append(output)
        if last_delta is not None:
            self._events.append(last_delta)
        self._seq_by_request.pop(info.request_id, None)
        self._aborting.discard(info.request_id)

    def take_finished(self) -> list[RequestOutput]:
        finished, self._finished = self._finished, []
        return finished

    def take_events(self) -> list[RequestOutput]:
        events, self._events = self._events, []
        return events

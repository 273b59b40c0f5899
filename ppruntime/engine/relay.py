"""The response relay: sample states and response diffs around the ring.

The last rank sends each batch's result to rank 0, which passes it to rank 1, and
so on (last -> 0 -> 1 -> ... -> last-1). Every rank queues the batch as *ready*;
rank 0's executor decides how many ready batches all ranks handle per iteration.

In async mode a background thread per rank carries the messages on the relay
communicator (duplicated in the main thread and passed in), so no executor loop
waits for the last stage. In deterministic mode the same steps run inline on the
executor thread at fixed iterations. The heavy response diff (log-probs, logits)
goes only to rank 0, sliced; the other ranks need only the tokens and finish codes.

The relay thread never waits on its send handles at shutdown: it hands them back
and the main thread waits on them after joining it (DESIGN §3).
"""

from __future__ import annotations

import threading
import time
from collections import deque

from mpi4py import MPI
from mpi4py.util import pkl5

from ppruntime.comm.communicators import current_thread_comm, thread_comm
from ppruntime.comm.sliced import (
    SendHandles,
    isend_object_sliced,
    recv_object_sliced,
)
from ppruntime.comm.tags import Tag
from ppruntime.comm.waiting import (
    Hurry,
    PacedBackoff,
    WaitAborted,
    WaitTracker,
    wait_raw_message,
)
from ppruntime.engine.last_stage import ResponseDiff
from ppruntime.engine.wire import SampleState, pack_sample_state, unpack_sample_state

ReadyBatch = tuple[SampleState, ResponseDiff | None]


class ReadyQueue:
    """Batches ready on this rank, in the order the last stage produced them."""

    def __init__(self) -> None:
        self._items: deque[ReadyBatch] = deque()
        self._condition = threading.Condition()
        self.hurry = Hurry()  # the relay thread polls fast while wait_for blocks

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: ReadyBatch) -> None:
        with self._condition:
            self._items.append(item)
            # the waiting consumer wakes up to work: back to slow polling (it asks
            # again if it still waits for more)
            self.hurry.end()
            self._condition.notify_all()

    def wait_for(self, count: int, timeout: float) -> bool:
        """Block (GIL released) until `count` batches are ready or `timeout` passes."""
        with self._condition:
            if len(self._items) >= count:
                return True
            if timeout == 0:
                return False
            deadline = time.monotonic() + timeout
            try:
                while len(self._items) < count:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    self.hurry.begin()
                    self._condition.wait(remaining)
                return True
            finally:
                self.hurry.end()

    def pop(self) -> ReadyBatch:
        with self._condition:
            return self._items.popleft()


class ResponseRelay:
    def __init__(
        self,
        comm: pkl5.Intracomm,
        threaded: bool,
        tracker: WaitTracker | None = None,
    ) -> None:
        self.comm = comm
        self.rank = comm.Get_rank()
        self.size = comm.Get_size()
        self.last = self.size - 1
        self.is_last = self.rank == self.last
        self.source = self.last if self.rank == 0 else self.rank - 1
        self.forward_to = self.rank + 1 if self.rank + 1 < self.last else None
        self.threaded = threaded and self.size > 1
        self.ready = ReadyQueue()
        self.tracker = tracker or WaitTracker()
        self._outbox: deque[ReadyBatch] = deque()
        self._outbox_signal = threading.Condition()
        self._stop = threading.Event()
        self._pending: list[SendHandles] = []
        self._pending_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self.error: BaseException | None = None

    # -- lifecycle ----------------------------------------------------------------
    def start(self) -> None:
        if not self.threaded:
            return
        target = self._run_sender if self.is_last else self._run_receiver
        self._thread = threading.Thread(
            target=target, name=f"ppruntime-relay-{self.rank}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, then wait (on this thread) for its sends to complete."""
        self._stop.set()
        with self._outbox_signal:
            self._outbox_signal.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._pending_lock:
            pending, self._pending = self._pending, []
        for handles in pending:
            handles.wait("relay sends to drain at shutdown", self.tracker)

    # -- last rank: publish --------------------------------------------------------
    def publish(self, state: SampleState, diff: ResponseDiff | None) -> None:
        """The last stage produced a batch result: ready here, then sent to rank 0."""
        self.ready.put((state, diff))
        if self.size == 1:
            return
        if self.threaded:
            with self._outbox_signal:
                self._outbox.append((state, diff))
                self._outbox_signal.notify()
        else:
            with thread_comm(self.comm):
                self._send((state, diff), dest=0, with_diff=True)
            self._test_pending()  # no thread reaps them in deterministic mode

    # -- deterministic mode: one batch, inline --------------------------------------
    def receive_inline(self) -> None:
        with thread_comm(self.comm):
            self._receive_one(should_stop=None, tracker=self.tracker)
        self._test_pending()

    # -- thread bodies --------------------------------------------------------------
    def _run_sender(self) -> None:
        with thread_comm(self.comm):
            while True:
                with self._outbox_signal:
                    while not self._outbox and not self._stop.is_set():
                        self._outbox_signal.wait(timeout=0.05)
                        self._test_pending()
                    if not self._outbox:
                        return
                    item = self._outbox.popleft()
                self._send(item, dest=0, with_diff=True)
                self._test_pending()

    def _run_receiver(self) -> None:
        with thread_comm(self.comm):
            while not self._stop.is_set():
                try:
                    self._receive_one(should_stop=self._should_stop_polling)
                except WaitAborted:
                    return
                self._test_pending()

    def _should_stop_polling(self) -> bool:
        self._test_pending()
        return self._stop.is_set()

    # -- steps shared by both modes --------------------------------------------------
    def _receive_one(self, should_stop, tracker: WaitTracker | None = None) -> None:
        """tracker: the executor's, when this runs inline on the executor thread."""
        comm = current_thread_comm()
        message = wait_raw_message(
            comm,
            self.source,
            Tag.SAMPLE_STATE,
            f"sample state from rank {self.source}",
            tracker=tracker,
            should_stop=should_stop,
            backoff=PacedBackoff(self.ready.hurry) if self.threaded else None,
        )
        state = unpack_sample_state(message)
        diff = None
        if state.has_diff and self.rank == 0:
            diff = recv_object_sliced(
                comm,
                self.source,
                Tag.RESPONSE_DIFF,
                Tag.PAYLOAD_SLICE,
                f"response diff from rank {self.source}",
                should_stop=should_stop,
            )
        if self.forward_to is not None:
            self._send((state, None), dest=self.forward_to, with_diff=False)
        self.ready.put((state, diff))

    def _send(self, item: ReadyBatch, dest: int, with_diff: bool) -> None:
        comm = current_thread_comm()
        state, diff = item
        light = SampleState(
            state.batch_id,
            state.slots,
            state.sampled,
            state.token_ids,
            state.finish,
            has_diff=with_diff and diff is not None,
        )
        message = pack_sample_state(light)
        handles = SendHandles(keep_alive=[message])
        handles.requests.append(comm.Isend([message, MPI.BYTE], dest, Tag.SAMPLE_STATE))
        sent = [handles]
        if light.has_diff:
            sent.append(
                isend_object_sliced(comm, diff, [dest], Tag.RESPONSE_DIFF, Tag.PAYLOAD_SLICE)
            )
        with self._pending_lock:
            self._pending.extend(sent)

    def _test_pending(self) -> None:
        with self._pending_lock:
            self._pending = [handles for handles in self._pending if not handles.test()]

"""Large payloads cut into slices so they never block the pipeline (DESIGN §2.4).

An object is pickled with protocol 5; its large buffers (numpy arrays: logits,
log-probs) travel out-of-band. Buffers over `slice_bytes` (2 MiB by default) are
cut into slices, and the slices for every destination are issued round-robin as
one batch of non-blocking sends, so no single transfer holds a link or MPI's progress
engine for long, and small activation and sample-state messages pass in between.
The receiver posts one slice receive at a time and yields after each slice: the
copies run in the receiving (relay) thread, not inside the executor's polls.
(Bounding the slices in flight on the sender, refilled as they complete, was
measured and made small-message latency worse on two cores: docs/benchmarks.md.)
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from ppruntime.comm.waiting import WaitTracker, recv_object, request_done, wait_request, wait_until

DEFAULT_SLICE_BYTES = 2 * 1024 * 1024
CANCEL_GRACE_S = 1.0
# Receive buffers whose cancelled receive did not complete within CANCEL_GRACE_S
# (e.g. the peer died mid-transfer): MPI may still write into them, so they are
# kept alive here until the process ends instead of being freed.
ABANDONED_RECEIVES: list[tuple[MPI.Request, np.ndarray]] = []


@dataclass
class SliceStats:
    """Counters of this process's sliced transfers (tests check the sliced path ran).

    sliced_sends / sliced_recvs: out-of-band buffers cut into more than one slice;
    slices_sent: slices issued in all (one per buffer and destination at least).
    """

    sliced_sends: int = 0
    sliced_recvs: int = 0
    slices_sent: int = 0


SLICE_STATS = SliceStats()


@dataclass
class SendHandles:
    """Requests of one send and the buffers they read from."""

    requests: list[MPI.Request] = field(default_factory=list)
    keep_alive: list[object] = field(default_factory=list)

    def test(self) -> bool:
        """Reap completed requests; True (and the buffers released) when all are done.

        Tests in issue order and stops at the first request still in flight: a
        sliced send has a hundred requests, and every MPI test drives (and locks)
        the progress engine that the executor's latency-critical polls share.
        """
        requests = self.requests
        done = 0
        while done < len(requests) and request_done(requests[done]):
            done += 1
        del requests[:done]
        if not requests:
            self.keep_alive.clear()
        return not requests

    def wait(self, what: str, tracker: WaitTracker | None = None) -> None:
        """Wait for every request (polling with backoff, never spinning)."""
        wait_until(self.test, what, tracker)


def _slice_bounds(size: int, slice_bytes: int) -> list[tuple[int, int]]:
    if size == 0:
        return []
    return [(start, min(start + slice_bytes, size)) for start in range(0, size, slice_bytes)]


def _round_robin(per_queue: list[list[tuple[int, int]]]) -> list[tuple[int, int, int]]:
    """(queue index, start, end) taking one slice from each queue in turn."""
    order = []
    depth = max((len(q) for q in per_queue), default=0)
    for level in range(depth):
        for index, queue in enumerate(per_queue):
            if level < len(queue):
                order.append((index, *queue[level]))
    return order


def isend_object_sliced(
    comm: MPI.Comm,
    obj: object,
    dests: Sequence[int],
    meta_tag: int,
    slice_tag: int,
    slice_bytes: int = DEFAULT_SLICE_BYTES,
) -> SendHandles:
    """Start sending `obj` to every rank in `dests`; wait on the handles later."""
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [np.frombuffer(buffer.raw(), dtype=np.uint8) for buffer in buffers]
    meta = (data, [raw.shape[0] for raw in raws])
    handles = SendHandles(keep_alive=[buffers, raws])
    for dest in dests:
        handles.requests.append(comm.isend(meta, dest, meta_tag))
    queues = [(dest, raw) for dest in dests for raw in raws]
    bounds = [_slice_bounds(raw.shape[0], slice_bytes) for _, raw in queues]
    SLICE_STATS.sliced_sends += sum(1 for queue in bounds if len(queue) > 1)
    order = _round_robin(bounds)
    SLICE_STATS.slices_sent += len(order)
    for index, start, end in order:
        dest, raw = queues[index]
        handles.requests.append(comm.Isend([raw[start:end], MPI.BYTE], dest, slice_tag))
    return handles


def _cancel_receive(request: MPI.Request, target: np.ndarray) -> None:
    """Cancel a posted receive and wait (bounded) until MPI is done with `target`."""
    if request_done(request):
        return
    request.Cancel()
    deadline = time.monotonic() + CANCEL_GRACE_S
    while not request_done(request):  # a matched receive completes instead of cancelling
        if time.monotonic() > deadline:
            ABANDONED_RECEIVES.append((request, target))
            return
        time.sleep(1e-3)


def recv_object_sliced(
    comm: MPI.Comm,
    source: int,
    meta_tag: int,
    slice_tag: int,
    what: str,
    slice_bytes: int = DEFAULT_SLICE_BYTES,
    tracker: WaitTracker | None = None,
    should_stop=None,
) -> object:
    """Receive an object sent by `isend_object_sliced` (same slice size)."""
    data, sizes = recv_object(comm, source, meta_tag, what, tracker, should_stop)
    targets = [np.empty(size, dtype=np.uint8) for size in sizes]
    bounds = [_slice_bounds(size, slice_bytes) for size in sizes]
    SLICE_STATS.sliced_recvs += sum(1 for queue in bounds if len(queue) > 1)
    # One receive posted at a time, by this thread: a slice that arrives before its
    # receive waits as a small unexpected header, and the copy happens here when the
    # receive is posted, never inside another thread's poll for a latency-critical
    # message (MPI progress is shared by every thread of the process).
    for index, start, end in _round_robin(bounds):
        request = comm.Irecv([targets[index][start:end], MPI.BYTE], source, slice_tag)
        try:
            wait_request(request, what, tracker, should_stop)
        except BaseException:
            _cancel_receive(request, targets[index])
            raise
        time.sleep(0)  # a slice copied: let latency-critical threads run first
    return pickle.loads(data, buffers=targets)

"""Large payloads cut into slices so they never block the pipeline (DESIGN §2.4).

An object is pickled with protocol 5; its large buffers (numpy arrays: logits,
log-probs) travel out-of-band. Buffers over `slice_bytes` (2 MiB by default) are
cut into slices, and the slices for every destination are issued round-robin as
one batch of non-blocking sends, so no single transfer holds a link or MPI's progress
engine for long, and small activation and sample-state messages pass in between.
A `window` can bound the slices in flight (refilled by `SendHandles.test()`); on the
two-core machine measured so far it made small-message latency worse, so the
default issues every slice at once (docs/benchmarks.md).
"""

from __future__ import annotations

import pickle
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from ppruntime.comm.waiting import WaitTracker, recv_object, request_done, wait_all, wait_until

DEFAULT_SLICE_BYTES = 2 * 1024 * 1024
DEFAULT_WINDOW = 0  # slices in flight per sliced send; 0 = all at once (see docs/benchmarks.md)


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
    """Requests of one (sliced) send, the buffers they read from, slices still to issue."""

    requests: list[MPI.Request] = field(default_factory=list)
    keep_alive: list[object] = field(default_factory=list)
    queued: deque = field(default_factory=deque)  # (comm, buffer view, dest, tag)
    window: int = DEFAULT_WINDOW  # 0: issue every slice at once

    def test(self, issue: bool = True) -> bool:
        """Reap completed requests, issue queued slices into the window; True when done.

        issue=False: only reap (an earlier send to the same ranks still has slices to
        issue, and slices must go out in order: receivers match them in order).
        """
        self.requests = [r for r in self.requests if not request_done(r)]
        while issue and self.queued and (self.window <= 0 or len(self.requests) < self.window):
            comm, view, dest, tag = self.queued.popleft()
            self.requests.append(comm.Isend([view, MPI.BYTE], dest, tag))
        if not self.requests and not self.queued:
            self.keep_alive.clear()
            return True
        return False

    def wait(self, what: str, tracker: WaitTracker | None = None) -> None:
        """Drive the send to completion (polling with backoff, never spinning)."""
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
    window: int = DEFAULT_WINDOW,
    issue_now: bool = True,
) -> SendHandles:
    """Start sending `obj` to every rank in `dests`; drive it with `handles.test()`.

    issue_now=False: send only the metadata now; slices start at the first `test()`
    (for a caller that keeps several sliced sends in order).
    """
    buffers: list[pickle.PickleBuffer] = []
    data = pickle.dumps(obj, protocol=5, buffer_callback=buffers.append)
    raws = [np.frombuffer(buffer.raw(), dtype=np.uint8) for buffer in buffers]
    meta = (data, [raw.shape[0] for raw in raws])
    handles = SendHandles(keep_alive=[buffers, raws], window=window)
    for dest in dests:
        handles.requests.append(comm.isend(meta, dest, meta_tag))
    queues = [(dest, raw) for dest in dests for raw in raws]
    bounds = [_slice_bounds(raw.shape[0], slice_bytes) for _, raw in queues]
    SLICE_STATS.sliced_sends += sum(1 for queue in bounds if len(queue) > 1)
    order = _round_robin(bounds)
    SLICE_STATS.slices_sent += len(order)
    for index, start, end in order:
        dest, raw = queues[index]
        handles.queued.append((comm, raw[start:end], dest, slice_tag))
    if issue_now:
        handles.test()  # the first `window` slices go out now
    return handles


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
    requests = [
        comm.Irecv([targets[index][start:end], MPI.BYTE], source, slice_tag)
        for index, start, end in _round_robin(bounds)
    ]
    try:
        wait_all(requests, what, tracker, should_stop)
    except BaseException:
        for request in requests:  # never leave a receive posted into freed memory
            if not request_done(request):
                request.Cancel()
        raise
    return pickle.loads(data, buffers=targets)

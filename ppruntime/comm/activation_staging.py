"""Outgoing activations: from a stage's output tensor to an MPI send, never blocking.

One interface, `ActivationSender`:
  send(slot_index, hidden) -> handle   start sending hidden [T, H] downstream; the
                                       handle (an MPI request, or one that becomes
                                       one) is kept in the microbatch slot and
                                       tested / waited on only when the slot is reused
  progress()                           post the sends that have become ready (never blocks)
  all_posted() -> bool                 progress(), then: has every send been posted?
  post_all(tracker)                    wait (polling, not spinning) until all_posted()

`ZeroCopySender` (CPU) sends the tensor's own memory, as the executor always did.
`PinnedStagingSender` (CUDA) copies the tensor into a pinned host buffer of its
microbatch slot on a copy stream (ordered after the compute stream) and posts the
MPI send once the copy's event has completed, so the host never waits for the GPU
to finish a forward. Each slot has its own pinned buffer (as many buffers as
slots), and a slot is reused only after its send completed, so no copy in flight
is ever overwritten. Sends are posted in the order they were made (MPI matches
messages of one tag in posting order, and the receiver expects microbatch order).

The executor calls progress() at each iteration, and every wait it makes runs it
between polls (WaitTracker.on_poll), so a send is posted within one poll interval
of its copy completing. (Issue 14 turns this object into the `host` channel.)
"""

from __future__ import annotations

from collections import deque
from typing import Protocol

import numpy as np
import torch
from mpi4py import MPI

from ppruntime.comm.waiting import WaitTracker, wait_until


def host_bytes(tensor: torch.Tensor) -> np.ndarray:
    """A numpy view of a contiguous host tensor, for MPI (numpy has no bfloat16)."""
    if tensor.dtype == torch.bfloat16:
        return tensor.view(torch.int16).numpy()
    return tensor.numpy()


class ActivationSender(Protocol):
    needs_polling: bool

    def send(self, slot_index: int, hidden: torch.Tensor) -> object: ...

    def progress(self) -> None: ...

    def all_posted(self) -> bool: ...

    def post_all(self, tracker: WaitTracker | None = None) -> None: ...


class ZeroCopySender:
    """CPU: MPI reads the output tensor itself, kept alive until its slot is reused."""

    needs_polling = False

    def __init__(self, comm: MPI.Comm, dest: int, tag: int, num_slots: int) -> None:
        self.comm = comm
        self.dest = dest
        self.tag = tag
        self._keep_alive: list[torch.Tensor | None] = [None] * num_slots

    def send(self, slot_index: int, hidden: torch.Tensor) -> MPI.Request:
        if not hidden.is_contiguous():
            hidden = hidden.contiguous()
        self._keep_alive[slot_index] = hidden
        return self.comm.Isend([host_bytes(hidden), MPI.BYTE], self.dest, self.tag)

    def progress(self) -> None:
        pass

    def all_posted(self) -> bool:
        return True

    def post_all(self, tracker: WaitTracker | None = None) -> None:
        pass


class StagedSend:
    """A send whose data is still being copied to the host: becomes an MPI request
    once the copy completed. test() has the pkl5 form (flag, None) that the waits use."""

    __slots__ = ("sender", "event", "buffer", "request")

    def __init__(self, sender: PinnedStagingSender, event, buffer: np.ndarray) -> None:
        self.sender = sender
        self.event = event  # None: the data was already on the host
        self.buffer = buffer
        self.request: MPI.Request | None = None

    @property
    def copied(self) -> bool:
        return self.event is None or self.event.query()

    def test(self) -> tuple[bool, None]:
        if self.request is None:
            self.sender.progress()
            if self.request is None:
                return False, None
        return self.request.Test(), None


class PinnedStagingSender:
    """CUDA: device -> pinned host copy on a copy stream, then MPI from the pinned buffer."""

    needs_polling = True

    def __init__(
        self,
        comm: MPI.Comm,
        dest: int,
        tag: int,
        num_slots: int,
        max_elements: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        self.comm = comm
        self.dest = dest
        self.tag = tag
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self._pinned = [
            torch.empty(max_elements, dtype=dtype, pin_memory=True) for _ in range(num_slots)
        ]
        self._events = [torch.cuda.Event() for _ in range(num_slots)]
        self._in_flight: list[StagedSend | None] = [None] * num_slots
        self._unposted: deque[StagedSend] = deque()

    def send(self, slot_index: int, hidden: torch.Tensor) -> StagedSend:
        previous = self._in_flight[slot_index]
        if previous is not None and (previous.request is None or not previous.request.Test()):
            raise RuntimeError(
                f"microbatch slot {slot_index} reused while its activation send is in flight"
            )
        count = hidden.numel()
        staging = self._pinned[slot_index][:count].view(hidden.shape)
        event = None
        if hidden.device.type == "cuda":
            event = self._events[slot_index]
            self.copy_stream.wait_stream(torch.cuda.current_stream(hidden.device))
            with torch.cuda.stream(self.copy_stream):
                staging.copy_(hidden, non_blocking=True)
                event.record(self.copy_stream)
            # the caching allocator must not hand hidden's memory to the compute
            # stream again before the copy stream has read it
            hidden.record_stream(self.copy_stream)
        else:
            staging.copy_(hidden)
        handle = StagedSend(self, event, host_bytes(staging))
        self._in_flight[slot_index] = handle
        self._unposted.append(handle)
        self.progress()
        return handle

    def progress(self) -> None:
        unposted = self._unposted
        while unposted and unposted[0].copied:
            handle = unposted.popleft()
            handle.request = self.comm.Isend([handle.buffer, MPI.BYTE], self.dest, self.tag)

    def all_posted(self) -> bool:
        self.progress()
        return not self._unposted

    def post_all(self, tracker: WaitTracker | None = None) -> None:
        if not self.all_posted():
            wait_until(self.all_posted, "device copies of outgoing activations", tracker)


def make_activation_sender(
    comm: MPI.Comm,
    dest: int,
    tag: int,
    num_slots: int,
    max_elements: int,
    dtype: torch.dtype,
    device: torch.device,
    tracker: WaitTracker | None = None,
) -> ActivationSender:
    """The sender for a stage computing on `device` (activations travel via the host).

    tracker: the sending thread's; its waits then post ready sends between polls."""
    if device.type != "cuda":
        return ZeroCopySender(comm, dest, tag, num_slots)
    sender = PinnedStagingSender(comm, dest, tag, num_slots, max_elements, dtype, device)
    if tracker is not None:
        tracker.on_poll = sender.progress
    return sender

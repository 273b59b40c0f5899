"""The `host` channel: activations travel over MPI through host memory.

Sends: the senders of comm.activation_staging (CPU: MPI reads the output tensor
itself; CUDA: a pinned per-slot copy on a copy stream, posted once copied).
Receives: CPU: MPI writes straight into the stage's persistent input buffer.
CUDA: MPI writes into one of two pinned host buffers (alternating, so the next
message can land while the previous one is still being copied), then an
asynchronous host-to-device copy on the compute stream fills the persistent input
buffer; a pinned buffer is reused only after its copy's event completed.
"""

from __future__ import annotations

import torch
from mpi4py import MPI

from ppruntime.comm.activation_staging import host_bytes, make_activation_sender
from ppruntime.comm.channels.base import InputBuffer, ReceiveChecks
from ppruntime.comm.waiting import WaitTracker, wait_request


class HostChannel:
    name = "host"

    def __init__(
        self,
        comm: MPI.Comm,
        rank: int,
        prev_rank: int | None,
        next_rank: int | None,
        tag: int,
        num_slots: int,
        max_elements: int,
        dtype: torch.dtype,
        device: torch.device,
        input_buffer: InputBuffer,
        tracker: WaitTracker | None = None,
    ) -> None:
        self.comm = comm
        self.tag = tag
        self.device = device
        self.input_buffer = input_buffer
        self.checks = ReceiveChecks(rank, prev_rank, dtype, max_elements)
        self.dtype_code = self.checks.dtype_code
        self.sender = None
        if next_rank is not None:
            self.sender = make_activation_sender(
                comm, next_rank, tag, num_slots, max_elements, dtype, device, tracker
            )
        self._on_cuda = device.type == "cuda"
        self._staging: list[torch.Tensor] = []
        self._staging_events: list[torch.cuda.Event | None] = []
        if prev_rank is not None and self._on_cuda:
            self._staging = [
                torch.empty(max_elements, dtype=dtype, pin_memory=True) for _ in range(2)
            ]
            self._staging_events = [None, None]
        self._next_staging = 0
        self._request: MPI.Request | None = None
        self._landing: torch.Tensor | None = None  # [T, H] where MPI writes
        self._staging_index = 0
        self._shape = (0, 0)
        # CPU: (num_tokens, hidden) -> (numpy bytes for MPI, [T, H] view), made once per
        # size: every torch call costs microseconds in the executor loop
        self._views: dict[tuple[int, int], tuple[object, torch.Tensor]] = {}

    def post_receive(self, num_tokens: int, hidden_size: int, dtype_code: int) -> None:
        if not self._on_cuda:
            views = self._views.get((num_tokens, hidden_size))
            if views is None:
                count = self.checks.count(num_tokens, hidden_size, dtype_code)
                landing = self.input_buffer(count)[:count]
                views = (host_bytes(landing), landing.view(num_tokens, hidden_size))
                self._views[(num_tokens, hidden_size)] = views
            elif dtype_code != self.dtype_code:
                self.checks.count(num_tokens, hidden_size, dtype_code)  # raises
            self._landing = views[1]
            self._request = self.comm.Irecv([views[0], MPI.BYTE], self.checks.source, self.tag)
            return
        count = self.checks.count(num_tokens, hidden_size, dtype_code)
        index = self._next_staging
        self._next_staging = 1 - index
        event = self._staging_events[index]
        if event is not None:
            event.synchronize()  # its last device copy (long done, two messages ago)
        landing = self._staging[index][:count]
        self._staging_index = index
        self._landing = landing
        self._shape = (num_tokens, hidden_size)
        self._request = self.comm.Irecv(
            [host_bytes(landing), MPI.BYTE], self.checks.source, self.tag
        )

    def wait_receive(self, tracker: WaitTracker | None) -> torch.Tensor:
        request, landing = self._request, self._landing
        self._request = None
        wait_request(request, f"activations from rank {self.checks.source}", tracker)
        if not self._on_cuda:
            return landing  # already [T, H], in the persistent input buffer
        count = landing.numel()
        target = self.input_buffer(count)[:count]
        target.copy_(landing, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        self._staging_events[self._staging_index] = event
        return target.view(self._shape)

    def send(self, slot_index: int, hidden: torch.Tensor) -> object:
        return self.sender.send(slot_index, hidden)

    def progress(self) -> None:
        if self.sender is not None:
            self.sender.progress()

    def post_all(self, tracker: WaitTracker | None = None) -> None:
        if self.sender is not None:
            self.sender.post_all(tracker)

    def close(self) -> None:
        pass

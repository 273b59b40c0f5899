"""The `cuda-aware-mpi` channel: MPI reads and writes device buffers directly.

Only where the MPI library reports CUDA support (choice.choose_channel refuses it
otherwise). MPI is not stream-aware: a send is posted once an event recorded on the
compute stream after the forward has completed (polled, like the pinned staging of
the host channel), and a receive is posted only after the compute stream finished
reading the persistent input buffer. Untested on this project's CI (no GPU).
"""

from __future__ import annotations

from collections import deque

import torch
from mpi4py import MPI

from ppruntime.comm.channels.base import InputBuffer, ReceiveChecks
from ppruntime.comm.waiting import WaitTracker, wait_request, wait_until


class DeviceSend:
    """A send waiting for its forward to finish; test() in the pkl5 form."""

    __slots__ = ("channel", "event", "tensor", "request")

    def __init__(self, channel: CudaAwareMPIChannel, event, tensor: torch.Tensor) -> None:
        self.channel = channel
        self.event = event
        self.tensor = tensor
        self.request: MPI.Request | None = None

    def test(self) -> tuple[bool, None]:
        if self.request is None:
            self.channel.progress()
            if self.request is None:
                return False, None
        return self.request.Test(), None


class CudaAwareMPIChannel:
    name = "cuda-aware-mpi"

    def __init__(
        self,
        comm: MPI.Comm,
        rank: int,
        prev_rank: int | None,
        next_rank: int | None,
        tag: int,
        max_elements: int,
        dtype: torch.dtype,
        device: torch.device,
        input_buffer: InputBuffer,
    ) -> None:
        self.comm = comm
        self.tag = tag
        self.next_rank = next_rank
        self.device = device
        self.input_buffer = input_buffer
        self.checks = ReceiveChecks(rank, prev_rank, dtype, max_elements)
        self.dtype_code = self.checks.dtype_code
        self._unposted: deque[DeviceSend] = deque()
        self._request: MPI.Request | None = None
        self._target: torch.Tensor | None = None
        self._shape = (0, 0)

    @staticmethod
    def _bytes(tensor: torch.Tensor) -> torch.Tensor:
        return tensor.view(torch.uint8)  # mpi4py takes it via __cuda_array_interface__

    def post_receive(self, num_tokens: int, hidden_size: int, dtype_code: int) -> None:
        count = self.checks.count(num_tokens, hidden_size, dtype_code)
        target = self.input_buffer(count)[:count]
        torch.cuda.current_stream(self.device).synchronize()  # the last forward read it
        self._target, self._shape = target, (num_tokens, hidden_size)
        self._request = self.comm.Irecv(
            [self._bytes(target), MPI.BYTE], self.checks.source, self.tag
        )

    def wait_receive(self, tracker: WaitTracker | None) -> torch.Tensor:
        request, self._request = self._request, None
        wait_request(request, f"activations from rank {self.checks.source}", tracker)
        return self._target.view(self._shape)

    def send(self, slot_index: int, hidden: torch.Tensor) -> DeviceSend:
        hidden = hidden.contiguous()
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        handle = DeviceSend(self, event, hidden)
        self._unposted.append(handle)
        self.progress()
        return handle

    def progress(self) -> None:
        unposted = self._unposted
        while unposted and unposted[0].event.query():
            handle = unposted.popleft()
            handle.request = self.comm.Isend(
                [self._bytes(handle.tensor), MPI.BYTE], self.next_rank, self.tag
            )

    def post_all(self, tracker: WaitTracker | None = None) -> None:
        wait_until(self._all_posted, "forwards before device-buffer sends", tracker)

    def _all_posted(self) -> bool:
        self.progress()
        return not self._unposted

    def close(self) -> None:
        pass

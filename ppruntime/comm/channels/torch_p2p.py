"""The `gloo` and `nccl` channels: torch.distributed point-to-point (isend/irecv).

One code path for both: gloo on CPU tensors (what CI runs), nccl on CUDA tensors.
With nccl, sends and receives are issued on a dedicated communication stream,
ordered after the compute stream by events (wait_stream), and the compute stream
waits for a receive before reading it (work.wait() on the current stream).

Waits are bounded and visible to the watchdog: the main thread polls a flag with
the usual backoff (comm.waiting) instead of blocking in work.wait(). With nccl the
flag is work.is_completed(). Gloo's point-to-point works never report completion
before wait() is called (and a wait with a timeout poisons the whole gloo context
when it expires), so with gloo a waiter thread per direction calls wait() on each
work in turn (FIFO: works to one peer complete in order) and raises the flag; the
thread sleeps inside gloo (the GIL released), it never spins. A dead peer makes
gloo's wait() fail: the error is re-raised in the main thread naming the peer.
"""

from __future__ import annotations

import queue
import threading

import torch

from ppruntime.comm.channels.base import InputBuffer, ReceiveChecks
from ppruntime.comm.waiting import WaitTracker, wait_until
from ppruntime.logs import get_logger

log = get_logger("channels")


class ChannelError(RuntimeError):
    """A point-to-point transfer failed (typically: the peer rank died)."""


class Transfer:
    """One isend/irecv in flight. done() never blocks; test() has the pkl5 form
    (flag, None) that comm.waiting uses, so a send's Transfer sits in the slot's
    request list like an MPI request."""

    __slots__ = (
        "work",
        "tensor",
        "what",
        "peer",
        "waited_elsewhere",
        "completed",
        "error",
        "_finished",
    )

    def __init__(
        self, work, tensor: torch.Tensor, what: str, peer: int, waited_elsewhere: bool
    ) -> None:
        self.work = work
        self.tensor = tensor  # kept alive until the transfer completed
        self.what = what
        self.peer = peer  # the rank at the other end
        # gloo: a Waiter thread calls wait() and sets `completed` or `error`; this
        # thread must then never touch the work (is_completed() turns true inside that
        # wait(), and a second wait() on a gloo work blocks for a second message)
        self.waited_elsewhere = waited_elsewhere
        self.completed = False
        self.error: BaseException | None = None
        self._finished = False

    def done(self) -> bool:
        if self._finished:
            return True
        if self.waited_elsewhere:
            if self.error is not None:
                raise ChannelError(self._failure(self.error)) from self.error
            if not self.completed:
                return False
        else:
            if not self.work.is_completed():
                return False
            try:  # nccl: raises the work's error; orders the current stream after it
                self.work.wait()
            except Exception as exc:
                raise ChannelError(self._failure(exc)) from exc
        self._finished = True
        self.tensor = None
        return True

    def _failure(self, error: BaseException) -> str:
        # a peer killed mid-transfer resets the connection here, often before mpirun has
        # reported that process's death: name it as the likely cause
        return (
            f"{self.what} failed (rank {self.peer} may have died or closed the connection): {error}"
        )

    def test(self) -> tuple[bool, None]:
        return self.done(), None


class Waiter:
    """A daemon thread calling wait() on each queued gloo work in turn."""

    def __init__(self, name: str) -> None:
        self._queue: queue.SimpleQueue[Transfer | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def add(self, transfer: Transfer) -> None:
        self._queue.put(transfer)

    def _run(self) -> None:
        while True:
            transfer = self._queue.get()
            if transfer is None:
                return
            try:
                transfer.work.wait()
            except BaseException as exc:  # the main thread re-raises it, naming the peer
                transfer.error = exc
                return  # the group is broken: later works cannot complete either
            transfer.completed = True

    def stop(self, timeout_s: float = 5.0) -> None:
        """End the thread and wait for it: a daemon thread still inside a gloo wait when
        the interpreter finalizes is killed while it takes the GIL back, and the C++
        frames it unwinds through abort the process ("terminate called without an
        active exception")."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("%s: still waiting on a transfer at close", self._thread.name)


class TorchP2PChannel:
    def __init__(
        self,
        backend: str,
        rank: int,
        prev_rank: int | None,
        next_rank: int | None,
        max_elements: int,
        dtype: torch.dtype,
        device: torch.device,
        input_buffer: InputBuffer,
    ) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.name = backend
        self.backend = backend
        self.next_rank = next_rank
        self.device = device
        self.input_buffer = input_buffer
        self.checks = ReceiveChecks(rank, prev_rank, dtype, max_elements)
        self.dtype_code = self.checks.dtype_code
        self._comm_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        threaded = backend == "gloo"
        self._send_waiter = (
            Waiter(f"gloo-sends-to-{next_rank}") if threaded and next_rank is not None else None
        )
        self._receive_waiter = (
            Waiter(f"gloo-receives-from-{prev_rank}")
            if threaded and prev_rank is not None
            else None
        )
        self._receive: Transfer | None = None
        self._target: torch.Tensor | None = None
        self._shape = (0, 0)

    def post_receive(self, num_tokens: int, hidden_size: int, dtype_code: int) -> None:
        count = self.checks.count(num_tokens, hidden_size, dtype_code)
        target = self.input_buffer(count)[:count]
        self._target, self._shape = target, (num_tokens, hidden_size)
        source = self.checks.source
        if self._comm_stream is None:
            work = self.dist.irecv(target, src=source)
        else:
            # the last forward may still read the buffer: overwrite it only after that
            self._comm_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._comm_stream):
                work = self.dist.irecv(target, src=source)
        transfer = Transfer(
            work,
            target,
            f"activations from rank {source} over {self.backend}",
            source,
            waited_elsewhere=self._receive_waiter is not None,
        )
        if self._receive_waiter is not None:
            self._receive_waiter.add(transfer)
        self._receive = transfer

    def wait_receive(self, tracker: WaitTracker | None) -> torch.Tensor:
        transfer, self._receive = self._receive, None
        wait_until(transfer.done, transfer.what, tracker)
        return self._target.view(self._shape)

    def send(self, slot_index: int, hidden: torch.Tensor) -> Transfer:
        if not hidden.is_contiguous():
            hidden = hidden.contiguous()
        if self._comm_stream is None:
            work = self.dist.isend(hidden, dst=self.next_rank)
        else:
            self._comm_stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self._comm_stream):
                work = self.dist.isend(hidden, dst=self.next_rank)
            hidden.record_stream(self._comm_stream)
        transfer = Transfer(
            work,
            hidden,
            f"activations to rank {self.next_rank} over {self.backend}",
            self.next_rank,
            waited_elsewhere=self._send_waiter is not None,
        )
        if self._send_waiter is not None:
            self._send_waiter.add(transfer)
        return transfer

    def progress(self) -> None:
        pass

    def post_all(self, tracker: WaitTracker | None = None) -> None:
        pass  # every send is posted when made

    def close(self) -> None:
        for waiter in (self._send_waiter, self._receive_waiter):
            if waiter is not None:
                waiter.stop()

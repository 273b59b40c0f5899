"""The communicators of one pipeline, by role, created once in the main thread.

`MPI_Comm_dup` is collective: every rank must call it, in the same order, from one
thread. Doing it inside the relay threads races (the PP >= 3 shutdown hangs of
DESIGN §3), so `PipelineComms.create()` duplicates everything up front and the
relay thread receives its communicator explicitly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from mpi4py import MPI
from mpi4py.util import pkl5

from ppruntime.comm.bounded import idup_within


@dataclass
class PipelineComms:
    """Owns the duplicated communicators of one engine.

    pipeline: executor loop (microbatch headers and activations), main thread only.
    relay: sample state and response diffs, relay thread only (or inline in
        deterministic mode, on the main thread).
    watchdog: stall diagnosis messages, watchdog thread only.
    """

    pipeline: pkl5.Intracomm
    relay: pkl5.Intracomm
    watchdog: pkl5.Intracomm
    _freed: bool = False

    @classmethod
    def create(
        cls, base: MPI.Intracomm | None = None, deadline: float | None = None
    ) -> PipelineComms:
        """deadline (time.monotonic()): give up then, raising comm.bounded.RanksMissing."""
        base = MPI.COMM_WORLD if base is None else base

        def dup(comm: MPI.Intracomm) -> MPI.Intracomm:
            if deadline is None:
                return comm.Dup()
            return idup_within(comm, deadline, "the duplication of the communicators")

        pipeline = dup(base)
        relay = dup(pipeline)
        watchdog = dup(pipeline)
        pipeline.Set_name("ppruntime.pipeline")
        relay.Set_name("ppruntime.relay")
        watchdog.Set_name("ppruntime.watchdog")
        return cls(pkl5.Intracomm(pipeline), pkl5.Intracomm(relay), pkl5.Intracomm(watchdog))

    @property
    def rank(self) -> int:
        return self.pipeline.Get_rank()

    @property
    def size(self) -> int:
        return self.pipeline.Get_size()

    def free(self) -> None:
        """Free the duplicates; call only after every thread using them has stopped."""
        if self._freed:
            return
        self._freed = True
        for comm in (self.watchdog, self.relay, self.pipeline):
            comm.Free()


class NoThreadCommunicatorError(RuntimeError):
    pass


_thread_state = threading.local()


@contextmanager
def thread_comm(comm: pkl5.Intracomm) -> Iterator[pkl5.Intracomm]:
    """Bind `comm` as the communicator of the current thread for the block."""
    previous = getattr(_thread_state, "comm", None)
    _thread_state.comm = comm
    try:
        yield comm
    finally:
        _thread_state.comm = previous


def current_thread_comm() -> pkl5.Intracomm:
    """The communicator bound to this thread by `thread_comm`; fails loudly if none."""
    comm = getattr(_thread_state, "comm", None)
    if comm is None:
        raise NoThreadCommunicatorError(
            f"thread {threading.current_thread().name!r} has no communicator bound; "
            f"wrap its work in ppruntime.comm.thread_comm(comm)"
        )
    return comm

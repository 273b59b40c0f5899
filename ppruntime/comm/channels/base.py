"""The activation channel seam: how one stage's activations reach the next stage.

One object per rank, made once at start-up, with the rank's two neighbours:
  post_receive(num_tokens, hidden_size, dtype_code)  start receiving [T, H] from
                                      the previous rank (the sizes of the header)
  wait_receive(tracker) -> tensor     wait for it (bounded, watchdog-visible): a
                                      [T, H] view of the stage's persistent input
                                      buffer, on the stage's device
  send(slot_index, hidden) -> handle  start sending [T, H] to the next rank; the
                                      handle (an MPI request or an object whose
                                      test() has the pkl5 form (flag, None)) lives
                                      in the microbatch slot and is waited on only
                                      when that slot is reused
  progress()                          post sends that became ready (never blocks)
  post_all(tracker)                   before a wait on the relay: post every send
  dtype_code                          the wire code of the activations' dtype, put
                                      in the microbatch header by rank 0

The executor only passes these through: buffers, dtypes and devices live here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch

from ppruntime.comm.activation_dtypes import DTYPES_BY_CODE, dtype_code_of
from ppruntime.comm.waiting import WaitTracker
from ppruntime.config import ACTIVATION_CHANNELS

CHANNEL_NAMES = ACTIVATION_CHANNELS
CHANNEL_ENV = "PPRUNTIME_ACTIVATION_CHANNEL"

InputBuffer = Callable[[int], torch.Tensor]
"""input_buffer(num_elements): the stage's persistent (flat) input buffer, at least
that long, on the stage's device (the runner owns it: its CUDA graphs read there)."""


class ActivationChannel(Protocol):
    name: str
    dtype_code: int

    def post_receive(self, num_tokens: int, hidden_size: int, dtype_code: int) -> None: ...

    def wait_receive(self, tracker: WaitTracker | None) -> torch.Tensor: ...

    def send(self, slot_index: int, hidden: torch.Tensor) -> object: ...

    def progress(self) -> None: ...

    def post_all(self, tracker: WaitTracker | None = None) -> None: ...

    def close(self) -> None: ...


class ReceiveChecks:
    """What every channel checks of an announced receive (shared by implementations)."""

    def __init__(self, rank: int, source: int | None, dtype: torch.dtype, capacity: int) -> None:
        self.rank = rank
        self.source = source
        self.dtype = dtype
        self.dtype_code = dtype_code_of(dtype)
        self.capacity = capacity  # elements of the largest message

    def count(self, num_tokens: int, hidden_size: int, dtype_code: int) -> int:
        if self.source is None:
            raise RuntimeError(f"rank {self.rank} is the first stage: it receives no activations")
        if dtype_code != self.dtype_code:
            sent = DTYPES_BY_CODE.get(dtype_code)
            raise RuntimeError(
                f"rank {self.source} sends activations as {sent} but rank {self.rank} computes "
                f"in {self.dtype}: start every rank with the same --dtype"
            )
        count = num_tokens * hidden_size
        if count > self.capacity:
            raise RuntimeError(
                f"rank {self.source} announces {num_tokens}x{hidden_size} activations, more "
                f"than the {self.capacity}-element input buffer of rank {self.rank}"
            )
        return count

"""Async scheduling at PP=1: the host prepares step k+1 while the device runs step k.

With one stage, rank 0 schedules, computes and samples. Without overlap each step
ends waiting for its sampled tokens, so host and device take turns. Here a step is
*launched* (forward, sampler kernels, the results' copy to pinned host memory) and
*completed* (waiting on that copy's event) and landed one iteration later, after the
next step was scheduled and launched behind it:

    iteration i:  schedule step i | launch step i | complete and land step i-1

Step i may continue sequences of step i-1 before their tokens are on the host (the
table calls them continuable): their input token is taken on the device from step
i-1's sampled ids (`carried_tokens`). At most two steps are in flight; a sequence
that finishes in step i-1 awaits release until step i lands, whose extra token for
it is discarded (LastStage.complete).
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch

from ppruntime.engine.last_stage import LastStage, LaunchedSample, ResponseDiff
from ppruntime.engine.scheduler import ScheduledBatch
from ppruntime.engine.wire import SampleState
from ppruntime.stage.step_inputs import CarriedTokens, StepInputs


class StepOverlap:
    """The launched steps of rank 0 at PP=1 whose results are not on the host yet."""

    def __init__(self, last_stage: LastStage, max_slots: int) -> None:
        self.last_stage = last_stage
        self.launched: deque[LaunchedSample] = deque()
        self._row_of_slot = np.full(max_slots, -1, dtype=np.int64)  # scratch

    @property
    def has_launched(self) -> bool:
        return bool(self.launched)

    def carried_tokens(self, batch: ScheduledBatch) -> CarriedTokens | None:
        """Where the continued rows of `batch` find their input token: the sampled ids
        of the newest launched step, on the device."""
        if batch.continuing.shape[0] == 0:
            return None
        source = self.launched[-1]
        num_continued = batch.continuing.shape[0]
        if (
            num_continued == source.slots.shape[0] == batch.num_seqs
            and batch.num_tokens == num_continued
            and np.array_equal(batch.slots, source.slots)
        ):
            # steady decode: the same sequences in the same order, every one continued,
            # one token each: token b is the step in flight's sample b
            return CarriedTokens(source.on_device.token_ids, None, None, num_continued)
        row_of_slot = self._row_of_slot
        row_of_slot[source.slots] = np.arange(source.slots.shape[0])
        sampled_rows = row_of_slot[batch.slots[batch.continuing]]
        row_of_slot[source.slots] = -1
        if (sampled_rows < 0).any():
            missing = batch.slots[batch.continuing][sampled_rows < 0].tolist()
            raise RuntimeError(f"slots {missing} are continued but sample in no step in flight")
        # a continued row computes one token: its flat index is the row's first token
        token_index = (np.cumsum(batch.num_new) - batch.num_new)[batch.continuing]
        return CarriedTokens(source.on_device.token_ids, sampled_rows, token_index)

    def launch(self, batch: ScheduledBatch, hidden: torch.Tensor, inputs: StepInputs) -> None:
        self.launched.append(self.last_stage.launch(batch, hidden, inputs))

    def complete_all_but(self, keep: int) -> list[tuple[SampleState, ResponseDiff | None]]:
        """Complete the oldest launched steps until `keep` remain (waiting on their
        results' copies); their results, oldest first, for the caller to land."""
        results = []
        while len(self.launched) > keep:
            results.append(self.last_stage.complete(self.launched.popleft()))
        return results

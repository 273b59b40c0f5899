"""Rank 0's scheduler: continuous batching, chunked prefill, FCFS, preemption.

Pure Python + numpy (no torch, no MPI). It decides one microbatch at a time from
the sequences that are not in flight (and, with async scheduling, from those the
table calls continuable), touching the running sequences only through array
operations. The decision (`ScheduledBatch`: slots, token counts, block ids,
admissions, preemptions) is what travels to the other ranks, which apply it with
`apply_schedule` exactly as rank 0 does.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ppruntime.engine.seq_table import SeqInfo, SequenceTable

_EMPTY_I32 = np.zeros(0, dtype=np.int32)
_EMPTY_I64 = np.zeros(0, dtype=np.int64)
# slot arrays are numpy's index type: indexing with int32 arrays converts them on
# every call (about 4x slower for a batch of 256 slots)
_EMPTY_SLOTS = np.zeros(0, dtype=np.intp)
_NO_ROWS = np.zeros(0, dtype=np.bool_)


@dataclass
class ScheduledBatch:
    """One microbatch as decided by rank 0 (slot arrays are intp, the rest int32)."""

    batch_id: int
    slots: np.ndarray  # [B] intp
    num_new: np.ndarray  # [B] int32: tokens computed for each sequence
    starts: np.ndarray  # [B] int32: position of each sequence's first new token
    sample_mask: np.ndarray  # [B] bool: the chunk reaches the end -> sample a token
    block_counts: np.ndarray  # [B] int32: new blocks per sequence
    block_ids: np.ndarray  # [sum(block_counts)] int32, in batch order
    admit_seq_ids: np.ndarray  # [A] int64: sequences entering the table...
    admit_slots: np.ndarray  # [A] intp: ...into these slots (before the batch starts)
    preempt_slots: np.ndarray  # [Pm] intp: blocks freed before the batch starts
    # [C] intp: batch rows continued before their step in flight landed (async
    # scheduling, rank 0 only): their input token is that step's sample, still on the device
    continuing: np.ndarray = field(default_factory=lambda: _EMPTY_SLOTS)

    @property
    def num_seqs(self) -> int:
        return int(self.slots.shape[0])

    @property
    def num_tokens(self) -> int:
        # memoised by hand: functools.cached_property takes a lock on Python 3.11
        cached = self.__dict__.get("_num_tokens")
        if cached is None:
            cached = self.__dict__["_num_tokens"] = int(self.num_new.sum())
        return cached


def apply_schedule(
    table: SequenceTable, batch: ScheduledBatch, pending: dict[int, SeqInfo]
) -> None:
    """Replay rank 0's decision on another rank (same order as rank 0 made it)."""
    if batch.preempt_slots.shape[0]:
        table.preempt(batch.preempt_slots)
    for seq_id, slot in zip(batch.admit_seq_ids.tolist(), batch.admit_slots.tolist()):
        table.admit(pending.pop(seq_id), slot)
    if batch.block_ids.shape[0]:
        table.blocks.take(batch.block_ids)
    _start(table, batch)


def _start(table: SequenceTable, batch: ScheduledBatch, verify: bool = True) -> None:
    table.append_blocks(batch.slots, batch.block_counts, batch.block_ids)
    table.start_batch(batch.slots, batch.starts, batch.num_new, verify)


class Scheduler:
    """Chooses the next microbatch on rank 0.

    max_batch_size / max_num_tokens bound one microbatch. With pp_size stages a
    microbatch takes at most ceil(unfinished / pp_size) sequences, so the requests
    spread over pp_size microbatches and every stage has work.

    continue_in_flight (async scheduling, PP=1): also schedule the sequences the table
    calls continuable, one decode token each, before their step in flight lands.
    """

    def __init__(
        self,
        table: SequenceTable,
        max_batch_size: int,
        max_num_tokens: int,
        pp_size: int,
        continue_in_flight: bool = False,
    ) -> None:
        if continue_in_flight and pp_size != 1:
            raise ValueError(f"continuing sequences in flight needs pp_size 1, got {pp_size}")
        self.table = table
        self.continue_in_flight = continue_in_flight
        self.blocks = table.blocks
        self.max_batch_size = max_batch_size
        self.max_num_tokens = max_num_tokens
        self.pp_size = pp_size
        self.waiting: deque[SeqInfo] = deque()
        self._next_batch_id = 0
        self.num_preemptions = 0  # sequences preempted so far (they recompute later)
        # (table version, waiting-queue changes) when a call left nothing to schedule:
        # the decision is a function of that state, so until it changes the next call
        # would find nothing either (and is skipped)
        self._waiting_changes = 0
        self._settled_at: tuple[int, int] | None = None

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + self.table.num_active

    def add(self, info: SeqInfo) -> None:
        self.waiting.append(info)
        self._waiting_changes += 1

    def remove_waiting(self, info: SeqInfo) -> bool:
        try:
            self.waiting.remove(info)
        except ValueError:
            return False
        self._waiting_changes += 1
        return True

    def schedule(self) -> ScheduledBatch | None:
        """Decide the next microbatch and apply it to rank 0's table."""
        if self._settled_at == (self.table.version, self._waiting_changes):
            return None
        batch, left_over = self._schedule()
        # a batch just started makes its sequences continuable at once (no table change)
        settled = not left_over and not self.waiting and not self.continue_in_flight
        if batch is None or settled:
            self._settled_at = (self.table.version, self._waiting_changes)
        return batch

    def _schedule(self) -> tuple[ScheduledBatch | None, bool]:
        """The batch, and whether ready running sequences were left out of it."""
        table = self.table
        cap = min(self.max_batch_size, max(1, -(-self.num_unfinished // self.pp_size)))
        slots, num_new, want, starts, num_ready, continued = self._pick_running(cap)
        counts = table.blocks_needed(slots, num_new, starts)
        num_needed = int(counts.sum())
        preempted: list[int] = []
        starved = False  # a running sequence waits for blocks: admit nothing new
        while num_needed > self.blocks.num_free_blocks:
            # preempt only when it makes the whole batch fit: a preemption that ends
            # in an empty batch would never reach the other ranks (they would diverge)
            victims = self._victims(exclude=slots)
            reclaimable = int(table.num_blocks[victims].sum())
            if victims.shape[0] and self.blocks.num_free_blocks + reclaimable >= num_needed:
                victim = int(victims[np.argmax(table.seq_id[victims])])
                table.preempt(np.array([victim], dtype=np.intp))
                preempted.append(victim)
                self.num_preemptions += 1
                continue
            # not enough to reclaim: schedule fewer sequences this time
            slots, num_new, want, starts = slots[:-1], num_new[:-1], want[:-1], starts[:-1]
            counts, continued = counts[:-1], continued[:-1]
            num_needed = int(counts.sum())
            starved = True
        assert slots.shape[0] or not preempted
        block_ids = self.blocks.allocate(num_needed)

        budget = self.max_num_tokens - int(num_new.sum())
        admitted = [] if starved else self._admit(cap - slots.shape[0], budget)
        if admitted:
            # an admitted sequence starts at 0 and wants its whole prompt
            admit_slots = np.array([info.slot for info, _, _ in admitted], dtype=np.intp)
            slots = np.concatenate([slots, admit_slots])
            num_new = np.concatenate(
                [num_new, np.array([n for _, n, _ in admitted], dtype=np.int32)]
            )
            want = np.concatenate([want, table.num_prompt[admit_slots]])
            starts = np.concatenate([starts, np.zeros(len(admitted), dtype=np.int32)])
            counts = np.concatenate(
                [counts, np.array([b.shape[0] for _, _, b in admitted], dtype=np.int32)]
            )
            block_ids = np.concatenate([block_ids] + [b for _, _, b in admitted])
            admit_seq_ids = np.array([info.seq_id for info, _, _ in admitted], dtype=np.int64)
        else:
            admit_slots, admit_seq_ids = _EMPTY_SLOTS, _EMPTY_I64
        left_over = slots.shape[0] - len(admitted) < num_ready
        if slots.shape[0] == 0:
            return None, left_over
        batch = ScheduledBatch(
            batch_id=self._next_batch_id,
            slots=slots,
            num_new=num_new,
            starts=starts,
            sample_mask=num_new == want,  # the chunk reaches the end of what is known
            block_counts=counts,
            block_ids=block_ids.astype(np.int32),
            admit_seq_ids=admit_seq_ids,
            admit_slots=admit_slots,
            preempt_slots=np.array(preempted, dtype=np.intp) if preempted else _EMPTY_SLOTS,
            continuing=np.flatnonzero(continued) if continued.any() else _EMPTY_SLOTS,
        )
        self._next_batch_id += 1
        _start(table, batch, verify=False)  # rank 0 took starts from its own table
        return batch, left_over

    def _pick_running(
        self, cap: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int, np.ndarray]:
        """Running sequences to continue, oldest first, within cap and token budget.

        Returns their slots, the tokens computed now, the tokens not computed yet
        (int32), their computed counts (the batch's starts), how many were ready, and
        which of them are continued while in flight ([n] bool).
        """
        table = self.table
        schedulable = table.active & ~table.in_flight
        if table.num_abort_requested:
            schedulable &= ~table.abort_requested
        continuable = None
        if self.continue_in_flight:
            continuable = table.continuable()
            schedulable |= continuable
        ready = np.flatnonzero(schedulable)
        num_ready = ready.shape[0]
        if num_ready == 0:
            return _EMPTY_SLOTS, _EMPTY_I32, _EMPTY_I32, _EMPTY_I32, 0, _NO_ROWS
        starts = table.num_computed[ready]
        want = table.num_prompt[ready] + table.num_output[ready] - starts
        if continuable is None:
            continued = np.zeros(num_ready, dtype=np.bool_)
        else:
            continued = continuable[ready]
            want += continued  # the token their step in flight samples comes next
        if num_ready <= cap and int(want.sum()) <= self.max_num_tokens:
            return ready, want, want, starts, num_ready, continued
        order = np.argsort(table.seq_id[ready], kind="stable")[:cap]  # oldest first
        ready, want, starts, continued = ready[order], want[order], starts[order], continued[order]
        cumulative = np.cumsum(want)
        fitting = int(np.searchsorted(cumulative, self.max_num_tokens, side="right"))
        if fitting == ready.shape[0]:
            return ready, want, want, starts, num_ready, continued
        # the first sequence that does not fit gets a chunk of what is left
        used = int(cumulative[fitting - 1]) if fitting else 0
        take = fitting + (1 if used < self.max_num_tokens else 0)
        num_new = want[:take].copy()
        if take > fitting:
            num_new[fitting] = self.max_num_tokens - used
        return ready[:take], num_new, want[:take], starts[:take], num_ready, continued[:take]

    def _victims(self, exclude: np.ndarray) -> np.ndarray:
        """Slots that may be preempted: idle, holding blocks, not in `exclude`.

        The latest-arrived of them (largest seq_id) is preempted first.
        """
        table = self.table
        candidates = table.active & ~table.in_flight & (table.num_blocks > 0)
        candidates[exclude] = False
        return np.flatnonzero(candidates)

    def _admit(self, room: int, budget: int) -> list[tuple[SeqInfo, int, np.ndarray]]:
        """Waiting requests enter the table in arrival order while they fit."""
        admitted = []
        table = self.table
        while self.waiting and room > 0 and budget > 0 and table.has_free_slot():
            info = self.waiting[0]
            num_new = min(int(info.prompt_token_ids.shape[0]), budget)
            needed = self.blocks.blocks_for_tokens(num_new)
            if not self.blocks.can_allocate(needed):
                break  # FCFS: later arrivals do not overtake the head of the queue
            self.waiting.popleft()
            table.admit(info, table.next_free_slot())
            admitted.append((info, num_new, self.blocks.allocate(needed)))
            room -= 1
            budget -= num_new
        return admitted

"""Per-sequence state that every rank keeps identically, as arrays (pure numpy).

A sequence gets a *slot* (a row in every array) when it is first scheduled and
keeps it until it finishes. Rank 0 decides; every rank applies the same decisions
in the same iteration, so the tables of all ranks stay equal: same slots, same
computed-token counts, same KV blocks, same in-flight set. Hot-path updates are
array operations over the slots of a batch, never a Python loop over requests.

With async scheduling (PP=1, rank 0 is the last stage) a sequence may be in two
steps at once: the next step *continues* it before the step in flight has brought
its token back (`continuable`). A sequence that finishes in the first of them
*awaits release*: its output is final, but the second step still uses its KV
blocks, so its slot is freed only when that step lands (`releasable`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ppruntime.engine.block_manager import BlockManager
from ppruntime.engine.sampling_params import SamplingParams


@dataclass(eq=False)
class SeqInfo:
    """What does not change while a request runs (touched once per request)."""

    seq_id: int  # dense integer id, assigned by rank 0 in arrival order
    request_id: str
    prompt_token_ids: np.ndarray  # [P] int32
    params: SamplingParams
    slot: int = -1


@dataclass
class BlockTableCounters:
    """Writes into the block table, by cause (DESIGN §2.3)."""

    row_writes: int = 0  # a sequence joined (admitted, or back after preemption)
    entry_writes: int = 0  # a sequence crossed a page boundary
    bytes_written: int = 0


class SequenceTable:
    """Arrays indexed by slot, plus the block table rows the stages read."""

    def __init__(
        self,
        max_slots: int,
        max_blocks_per_seq: int,
        block_manager: BlockManager,
        token_table_len: int | None = None,
        max_model_len: int | None = None,
    ) -> None:
        """token_table_len: keep every slot's prompt + output tokens (rank 0 only).
        max_model_len: the longest sequence (prompt + output); None = no limit but
        max_tokens (only `continuable` reads the output limit it sets)."""
        self.blocks = block_manager
        self.block_size = block_manager.block_size
        self.max_slots = max_slots
        self.max_blocks_per_seq = max_blocks_per_seq
        self.active = np.zeros(max_slots, dtype=np.bool_)
        self.max_model_len = max_model_len
        self.in_flight = np.zeros(max_slots, dtype=np.bool_)  # steps_in_flight > 0
        self.steps_in_flight = np.zeros(max_slots, dtype=np.int8)  # 0, 1 (2: continued)
        self.awaiting_release = np.zeros(max_slots, dtype=np.bool_)
        # the output count at which a sequence ends by length: min(max_tokens, room left)
        self.output_limit = np.zeros(max_slots, dtype=np.int32)
        self.abort_requested = np.zeros(max_slots, dtype=np.bool_)
        self.seq_id = np.full(max_slots, -1, dtype=np.int64)
        self.num_prompt = np.zeros(max_slots, dtype=np.int32)
        self.num_output = np.zeros(max_slots, dtype=np.int32)
        self.num_computed = np.zeros(max_slots, dtype=np.int32)
        self.num_blocks = np.zeros(max_slots, dtype=np.int32)
        self.block_table = np.zeros((max_slots, max_blocks_per_seq), dtype=np.int32)
        # rows written since a device copy last took them (read and cleared by the stage)
        self.rows_changed = np.zeros(max_slots, dtype=np.bool_)
        self.counters = BlockTableCounters()
        self.token_table = (
            np.zeros((max_slots, token_table_len), dtype=np.int32)
            if token_table_len is not None
            else None
        )
        self.infos: list[SeqInfo | None] = [None] * max_slots
        self._free_slots = list(range(max_slots - 1, -1, -1))
        self.num_in_flight_batches = 0
        self.num_abort_requested = 0
        self.num_awaiting_release = 0
        # bumped by every change that can make a sequence schedulable or free KV blocks
        # (the scheduler skips its work while this and its waiting queue are unchanged)
        self.version = 0

    # -- membership ---------------------------------------------------------------
    @property
    def num_active(self) -> int:
        return self.max_slots - len(self._free_slots)

    def has_free_slot(self) -> bool:
        return bool(self._free_slots)

    def next_free_slot(self) -> int:
        return self._free_slots[-1]

    def admit(self, info: SeqInfo, slot: int) -> None:
        """Give `info` the slot rank 0 chose (the same on every rank)."""
        if not self._free_slots or self._free_slots[-1] != slot:
            raise RuntimeError(
                f"slot divergence: rank 0 admitted sequence {info.seq_id} into slot {slot} "
                f"but this rank's next free slot is "
                f"{self._free_slots[-1] if self._free_slots else None}"
            )
        self._free_slots.pop()
        self.version += 1
        info.slot = slot
        self.infos[slot] = info
        self.active[slot] = True
        self.in_flight[slot] = False
        self.steps_in_flight[slot] = 0
        self.abort_requested[slot] = False
        self.seq_id[slot] = info.seq_id
        num_prompt = info.prompt_token_ids.shape[0]
        self.num_prompt[slot] = num_prompt
        limit = info.params.max_tokens
        if self.max_model_len is not None:
            limit = min(limit, self.max_model_len - num_prompt)
        self.output_limit[slot] = limit
        self.num_output[slot] = 0
        self.num_computed[slot] = 0
        self.num_blocks[slot] = 0
        if self.token_table is not None:
            self.token_table[slot, : self.num_prompt[slot]] = info.prompt_token_ids

    def output_tokens(self, slot: int) -> np.ndarray:
        """The generated tokens of `slot` so far (rank 0 only): a copy."""
        assert self.token_table is not None
        start = int(self.num_prompt[slot])
        return self.token_table[slot, start : start + int(self.num_output[slot])].copy()

    def request_abort(self, slot: int) -> None:
        """Mark an in-flight sequence: it finishes as aborted when its batch lands."""
        if not self.abort_requested[slot]:
            self.abort_requested[slot] = True
            self.num_abort_requested += 1
            self.version += 1

    def await_release(self, slots: list[int]) -> None:
        """The sequences finished while a step that uses their blocks is in flight:
        nothing more is scheduled or reported for them; `releasable` names them once
        that step has landed."""
        index = np.array(slots, dtype=np.intp)
        assert self.in_flight[index].all(), f"slots {slots}: no step in flight to wait for"
        if self.num_abort_requested:  # the abort is done: it must not finish them again
            self.num_abort_requested -= int(np.count_nonzero(self.abort_requested[index]))
            self.abort_requested[index] = False
        self.num_awaiting_release += int(np.count_nonzero(~self.awaiting_release[index]))
        self.awaiting_release[index] = True
        self.version += 1

    def releasable(self) -> list[int]:
        """Slots awaiting release whose last step in flight has landed."""
        if not self.num_awaiting_release:
            return []
        return np.flatnonzero(self.awaiting_release & ~self.in_flight).tolist()

    def continuable(self) -> np.ndarray:
        """[max_slots] bool: sequences the next step may continue before their step in
        flight lands (async scheduling): one step in flight, which samples their next
        token (it computed every known token), and which cannot end them by length;
        no abort requested, not awaiting release. A sequence that still ends in that
        step (eos, stop, non-finite logits) awaits release until the next one lands."""
        mask = self.steps_in_flight == 1
        mask &= self.num_computed == self.num_prompt + self.num_output
        mask &= self.num_output + 1 < self.output_limit
        if self.num_abort_requested:
            mask &= ~self.abort_requested
        if self.num_awaiting_release:
            mask &= ~self.awaiting_release
        return mask

    def release(self, slot: int) -> SeqInfo:
        """The sequence finished or was aborted: free its blocks and its slot."""
        info = self.infos[slot]
        self.release_many([slot])
        return info

    def release_many(self, slots: list[int]) -> None:
        """The sequences finished or were aborted: free their blocks and slots.

        The blocks of all `slots` go back in one call (every rank releases the same
        slots in the same order, so the free lists stay equal).
        """
        assert slots, "nothing to release"
        assert len(set(slots)) == len(slots), f"a slot is released twice: {slots}"
        for slot in slots:
            assert self.infos[slot] is not None, f"slot {slot} is not in use"
        num_blocks = self.num_blocks
        if len(slots) == 1:
            freed = self.block_table[slots[0], : num_blocks[slots[0]]]
        else:
            freed = np.concatenate([self.block_table[slot, : num_blocks[slot]] for slot in slots])
        self.blocks.free(freed)
        index = np.array(slots, dtype=np.intp)
        num_blocks[index] = 0
        assert not self.in_flight[index].any(), f"slots {slots}: a step in flight uses them"
        self.active[index] = False
        self.seq_id[index] = -1
        if self.num_awaiting_release:
            self.num_awaiting_release -= int(np.count_nonzero(self.awaiting_release[index]))
            self.awaiting_release[index] = False
        if self.num_abort_requested:
            self.num_abort_requested -= int(np.count_nonzero(self.abort_requested[index]))
            self.abort_requested[index] = False
        for slot in slots:
            self.infos[slot] = None
        self._free_slots.extend(slots)
        self.version += 1

    def preempt(self, slots: np.ndarray) -> None:
        """Free the blocks of `slots`; they recompute prompt + output later."""
        for slot in slots.tolist():
            self.blocks.free(self.block_table[slot, : self.num_blocks[slot]])
        self.num_blocks[slots] = 0
        self.num_computed[slots] = 0
        self.version += 1

    # -- blocks -------------------------------------------------------------------
    def blocks_needed(
        self, slots: np.ndarray, num_new: np.ndarray, computed: np.ndarray | None = None
    ) -> np.ndarray:
        """Extra blocks each slot needs to hold `num_new` more tokens (int32).

        computed: the slots' computed-token counts, when the caller has them.
        """
        if computed is None:
            computed = self.num_computed[slots]
        after = (computed + num_new + (self.block_size - 1)) // self.block_size
        needed = after - self.num_blocks[slots]
        np.maximum(needed, 0, out=needed)
        return needed

    def append_blocks(self, slots: np.ndarray, counts: np.ndarray, block_ids: np.ndarray) -> None:
        """Write newly allocated blocks after each slot's existing ones.

        Only the new entries are written: one entry per slot at a page boundary,
        a whole row when a sequence (re)joins with an empty row.
        """
        if block_ids.shape[0] == 0:
            return
        with_blocks = counts > 0
        target_slots = slots[with_blocks]
        target_counts = counts[with_blocks]
        counters = self.counters
        if int(target_counts.max()) == 1:
            columns = self.num_blocks[target_slots]
            self.block_table[target_slots, columns] = block_ids
            joined = int(np.count_nonzero(columns == 0))
            counters.row_writes += joined
            counters.entry_writes += target_slots.shape[0] - joined
        else:
            offset = 0
            for slot, count in zip(target_slots.tolist(), target_counts.tolist()):
                have = int(self.num_blocks[slot])
                self.block_table[slot, have : have + count] = block_ids[offset : offset + count]
                offset += count
                if have == 0:
                    counters.row_writes += 1
                else:
                    counters.entry_writes += count
        counters.bytes_written += block_ids.shape[0] * 4
        self.num_blocks[target_slots] += target_counts
        self.rows_changed[target_slots] = True

    # -- a batch's life -----------------------------------------------------------
    def start_batch(
        self, slots: np.ndarray, starts: np.ndarray, num_new: np.ndarray, verify: bool = True
    ) -> None:
        """verify: check the replay against this rank's state (ranks > 0; rank 0 decided it)."""
        if verify:
            self._verify_start(slots, starts)
        self.num_computed[slots] = starts + num_new
        self.in_flight[slots] = True
        self.steps_in_flight[slots] += 1
        self.num_in_flight_batches += 1

    def _verify_start(self, slots: np.ndarray, starts: np.ndarray) -> None:
        if self.in_flight[slots].any():
            raise RuntimeError(f"slots {slots[self.in_flight[slots]].tolist()} already in flight")
        if not np.array_equal(self.num_computed[slots], starts):
            raise RuntimeError(
                f"schedule divergence: rank 0 starts slots {slots.tolist()} at "
                f"{starts.tolist()} but this rank has {self.num_computed[slots].tolist()}"
            )

    def land_batch(
        self, slots: np.ndarray, sampled: np.ndarray, token_ids: np.ndarray
    ) -> np.ndarray:
        """The batch's results are handled: sampled sequences gain one token.

        Returns the slots that gained a token.
        """
        remaining = self.steps_in_flight[slots] - 1
        self.steps_in_flight[slots] = remaining
        self.in_flight[slots] = remaining > 0
        if sampled.all():  # decode: every sequence sampled
            gained, tokens = slots, token_ids
        else:
            gained, tokens = slots[sampled], token_ids[sampled]
        num_output = self.num_output[gained]
        if self.token_table is not None:
            self.token_table[gained, self.num_prompt[gained] + num_output] = tokens
        self.num_output[gained] = num_output + 1
        self.num_in_flight_batches -= 1
        self.version += 1
        return gained

    def all_blocks_free(self) -> bool:
        return self.blocks.all_free()

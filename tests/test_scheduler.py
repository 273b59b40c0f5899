"""Scheduler + SequenceTable tests, including a rank-0 / replica replay simulation.

Pure Python + numpy: no MPI, no model. The "replica" is driven only by
`apply_schedule` with the batch sent through the real wire format, exactly as a
rank > 0 would be.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import pytest

from ppruntime.engine.block_manager import BlockManager
from ppruntime.engine.sampling_params import SamplingParams
from ppruntime.engine.scheduler import ScheduledBatch, Scheduler, apply_schedule
from ppruntime.engine.seq_table import SeqInfo, SequenceTable
from ppruntime.engine.wire import (
    MicrobatchHeader,
    SampleState,
    microbatch_capacity,
    pack_microbatch,
    pack_sample_state,
    unpack_microbatch,
    unpack_sample_state,
)

TABLE_ARRAYS = (
    "active",
    "in_flight",
    "abort_requested",
    "seq_id",
    "num_prompt",
    "num_output",
    "num_computed",
    "num_blocks",
    "block_table",
)


def make_info(seq_id: int, prompt_len: int, max_tokens: int = 16) -> SeqInfo:
    prompt = (np.arange(prompt_len, dtype=np.int32) * 7 + seq_id) % 1000
    return SeqInfo(seq_id, f"req-{seq_id}", prompt, SamplingParams(max_tokens=max_tokens))


def copy_info(info: SeqInfo) -> SeqInfo:
    return SeqInfo(info.seq_id, info.request_id, info.prompt_token_ids.copy(), info.params)


def make_rank0(
    num_blocks=64,
    block_size=4,
    max_slots=16,
    max_blocks_per_seq=32,
    max_batch_size=8,
    max_num_tokens=64,
    pp_size=1,
    token_table_len=None,
):
    table = SequenceTable(
        max_slots, max_blocks_per_seq, BlockManager(num_blocks, block_size), token_table_len
    )
    return table, Scheduler(table, max_batch_size, max_num_tokens, pp_size)


def land(table: SequenceTable, batch: ScheduledBatch, tokens=None) -> None:
    if tokens is None:
        tokens = np.full(batch.num_seqs, 5, dtype=np.int32)
    table.land_batch(batch.slots, batch.sample_mask, tokens)


def by_seq(table: SequenceTable, batch: ScheduledBatch) -> dict[int, tuple[int, int, bool]]:
    """seq_id -> (start, num_new, sample) for one batch."""
    return {
        int(table.seq_id[s]): (int(st), int(n), bool(m))
        for s, st, n, m in zip(batch.slots, batch.starts, batch.num_new, batch.sample_mask)
    }


# -- SequenceTable ------------------------------------------------------------------
def test_admit_must_use_the_next_free_slot():
    table = SequenceTable(4, 8, BlockManager(8, 4))
    assert table.next_free_slot() == 0
    with pytest.raises(RuntimeError, match="slot divergence"):
        table.admit(make_info(0, 3), 1)
    info = make_info(0, 3)
    table.admit(info, 0)
    assert info.slot == 0 and table.infos[0] is info and table.num_active == 1
    assert table.active[0] and table.seq_id[0] == 0 and table.num_prompt[0] == 3


def test_release_returns_info_frees_blocks_and_reuses_slot_lifo():
    table = SequenceTable(3, 8, BlockManager(8, 4))
    for seq_id in range(3):
        table.admit(make_info(seq_id, 5), table.next_free_slot())
    assert not table.has_free_slot()
    slots = np.array([0, 1], dtype=np.int32)
    counts = table.blocks_needed(slots, np.array([5, 5], dtype=np.int32))
    assert counts.tolist() == [2, 2]
    table.append_blocks(slots, counts, table.blocks.allocate(4))
    assert table.release(1).seq_id == 1
    assert table.blocks.num_free_blocks == 6 and table.num_blocks[1] == 0
    assert not table.active[1] and table.seq_id[1] == -1 and table.infos[1] is None
    assert table.next_free_slot() == 1
    table.release(0)
    table.release(2)
    assert table.next_free_slot() == 2 and table.all_blocks_free()


def test_start_and_land_batch_track_computed_and_outputs():
    table = SequenceTable(2, 8, BlockManager(8, 4), token_table_len=16)
    table.admit(make_info(0, 3), 0)
    slots = np.array([0], dtype=np.int32)
    with pytest.raises(RuntimeError, match="divergence"):
        table.start_batch(slots, np.array([1], dtype=np.int32), np.array([2], dtype=np.int32))
    table.start_batch(slots, np.array([0], dtype=np.int32), np.array([3], dtype=np.int32))
    assert table.in_flight[0] and table.num_in_flight_batches == 1 and table.num_computed[0] == 3
    with pytest.raises(RuntimeError, match="in flight"):
        table.start_batch(slots, np.array([3], dtype=np.int32), np.array([1], dtype=np.int32))
    table.land_batch(slots, np.array([True]), np.array([42], dtype=np.int32))
    assert not table.in_flight[0] and table.num_in_flight_batches == 0
    assert table.num_output[0] == 1 and table.output_tokens(0).tolist() == [42]
    # an unsampled landing (a prefill chunk) gains nothing
    table.start_batch(slots, np.array([3], dtype=np.int32), np.array([1], dtype=np.int32))
    table.land_batch(slots, np.array([False]), np.array([-1], dtype=np.int32))
    assert table.num_output[0] == 1 and table.output_tokens(0).tolist() == [42]


def test_token_table_holds_prompt_then_outputs_and_readmission_overwrites():
    table = SequenceTable(1, 8, BlockManager(8, 4), token_table_len=8)
    info = make_info(0, 3)
    table.admit(info, 0)
    assert table.token_table[0, :3].tolist() == info.prompt_token_ids.tolist()
    slots = np.array([0], dtype=np.int32)
    table.start_batch(slots, np.array([0], dtype=np.int32), np.array([3], dtype=np.int32))
    table.land_batch(slots, np.array([True]), np.array([9], dtype=np.int32))
    assert table.token_table[0, :4].tolist() == info.prompt_token_ids.tolist() + [9]
    table.release(0)
    table.admit(make_info(1, 2), 0)
    assert table.num_output[0] == 0 and table.num_computed[0] == 0
    assert table.output_tokens(0).shape == (0,)


def test_preempt_frees_blocks_and_resets_computed():
    table = SequenceTable(2, 8, BlockManager(8, 4))
    table.admit(make_info(0, 6), 0)
    slots = np.array([0], dtype=np.int32)
    table.append_blocks(slots, np.array([2], dtype=np.int32), table.blocks.allocate(2))
    table.start_batch(slots, np.array([0], dtype=np.int32), np.array([6], dtype=np.int32))
    table.land_batch(slots, np.array([True]), np.array([1], dtype=np.int32))
    table.preempt(slots)
    assert table.num_computed[0] == 0 and table.num_blocks[0] == 0 and table.all_blocks_free()
    assert table.active[0] and table.num_output[0] == 1  # keeps slot and outputs


def test_blocks_needed():
    table = SequenceTable(3, 8, BlockManager(16, 4))
    for seq_id in range(3):
        table.admit(make_info(seq_id, 8), seq_id)
    slots = np.arange(3, dtype=np.int32)
    table.num_computed[:] = [0, 4, 3]
    table.num_blocks[:] = [0, 1, 1]
    assert table.blocks_needed(slots, np.array([1, 1, 1], dtype=np.int32)).tolist() == [1, 1, 0]
    assert table.blocks_needed(slots, np.array([9, 4, 6], dtype=np.int32)).tolist() == [3, 1, 2]
    # a slot that already holds more blocks than it needs gets 0, not a negative count
    table.num_blocks[2] = 3
    assert table.blocks_needed(slots[2:], np.array([1], dtype=np.int32)).tolist() == [0]


def test_append_blocks_counters_rows_and_entries():
    table = SequenceTable(3, 8, BlockManager(32, 4))
    for seq_id in range(3):
        table.admit(make_info(seq_id, 8), seq_id)
    slots = np.arange(3, dtype=np.int32)
    # multi-block path: two joiners and one with no new block
    table.append_blocks(slots, np.array([2, 0, 3], dtype=np.int32), table.blocks.allocate(5))
    c = table.counters
    assert (c.row_writes, c.entry_writes, c.bytes_written) == (2, 0, 20)
    assert table.num_blocks.tolist() == [2, 0, 3]
    assert table.block_table[0, :2].tolist() == [0, 1]
    assert table.block_table[2, :3].tolist() == [2, 3, 4]
    # single-block fast path: one joiner (slot 1) and two page crossings
    table.append_blocks(slots, np.array([1, 1, 1], dtype=np.int32), table.blocks.allocate(3))
    assert (c.row_writes, c.entry_writes, c.bytes_written) == (3, 2, 32)
    assert table.block_table[0, :3].tolist() == [0, 1, 5]
    assert table.block_table[1, :1].tolist() == [6]
    assert table.block_table[2, :4].tolist() == [2, 3, 4, 7]
    # multi-block path with an existing row: entries, not a row
    table.append_blocks(slots[:1], np.array([2], dtype=np.int32), table.blocks.allocate(2))
    assert (c.row_writes, c.entry_writes) == (3, 4)
    assert table.block_table[0, :5].tolist() == [0, 1, 5, 8, 9]
    # nothing to append: nothing counted
    table.append_blocks(slots, np.zeros(3, dtype=np.int32), np.zeros(0, dtype=np.int32))
    assert (c.row_writes, c.entry_writes, c.bytes_written) == (3, 4, 40)


# -- Scheduler: single decisions ----------------------------------------------------
def test_empty_scheduler_returns_none():
    _, scheduler = make_rank0()
    assert scheduler.schedule() is None


def test_prefill_then_decode_with_sampling():
    table, scheduler = make_rank0(token_table_len=64)
    scheduler.add(make_info(0, 6))
    batch = scheduler.schedule()
    assert batch.batch_id == 0
    assert batch.slots.tolist() == [0] and batch.starts.tolist() == [0]
    assert batch.num_new.tolist() == [6] and batch.sample_mask.tolist() == [True]
    assert batch.admit_seq_ids.tolist() == [0] and batch.admit_slots.tolist() == [0]
    assert batch.block_counts.tolist() == [2] and batch.block_ids.tolist() == [0, 1]
    assert batch.preempt_slots.shape == (0,)
    assert scheduler.schedule() is None  # the only sequence is in flight
    land(table, batch)
    decode = scheduler.schedule()
    assert decode.batch_id == 1
    assert decode.starts.tolist() == [6] and decode.num_new.tolist() == [1]
    assert decode.sample_mask.tolist() == [True] and decode.admit_seq_ids.shape == (0,)
    assert decode.block_counts.tolist() == [0]


def test_chunked_prefill_splits_a_long_prompt_with_contiguous_starts():
    table, scheduler = make_rank0(max_num_tokens=4)
    scheduler.add(make_info(0, 10))
    seen = []
    while True:
        batch = scheduler.schedule()
        seen.append((int(batch.starts[0]), int(batch.num_new[0]), bool(batch.sample_mask[0])))
        assert batch.num_tokens <= 4
        land(table, batch)
        if batch.sample_mask[0]:
            break
    assert seen == [(0, 4, False), (4, 4, False), (8, 2, True)]
    assert table.num_computed[0] == 10 and table.num_output[0] == 1
    assert table.num_blocks[0] == 3


def test_token_budget_chunks_the_sequence_that_does_not_fit():
    table, scheduler = make_rank0(max_num_tokens=6)
    scheduler.add(make_info(0, 3))
    scheduler.add(make_info(1, 5))
    batch = scheduler.schedule()
    assert by_seq(table, batch) == {0: (0, 3, True), 1: (0, 3, False)}
    land(table, batch)
    batch = scheduler.schedule()
    # running sequences, oldest first: seq 0 decodes, seq 1 finishes its prompt
    assert by_seq(table, batch) == {0: (3, 1, True), 1: (3, 2, True)}


def test_running_sequences_exactly_filling_the_budget():
    table, scheduler = make_rank0(max_num_tokens=4)
    for seq_id in range(4):
        scheduler.add(make_info(seq_id, 1))
    batch = scheduler.schedule()
    assert batch.num_tokens == 4 and batch.num_seqs == 4
    land(table, batch)
    scheduler.add(make_info(4, 1))
    batch = scheduler.schedule()
    assert batch.num_tokens == 4 and 4 not in by_seq(table, batch)
    assert len(scheduler.waiting) == 1


def test_max_batch_size_is_respected():
    table, scheduler = make_rank0(max_batch_size=3, max_num_tokens=1000)
    for seq_id in range(7):
        scheduler.add(make_info(seq_id, 2))
    batch = scheduler.schedule()
    assert batch.num_seqs == 3 and sorted(by_seq(table, batch)) == [0, 1, 2]
    land(table, batch)
    batch = scheduler.schedule()
    # the running ones first (cap 3), so nothing new is admitted
    assert sorted(by_seq(table, batch)) == [0, 1, 2]


def test_pp_cap_spreads_requests_over_microbatches():
    table, scheduler = make_rank0(max_batch_size=8, pp_size=2)
    for seq_id in range(5):
        scheduler.add(make_info(seq_id, 2))
    first = scheduler.schedule()
    assert sorted(by_seq(table, first)) == [0, 1, 2]  # ceil(5 / 2)
    second = scheduler.schedule()
    assert sorted(by_seq(table, second)) == [3, 4]
    assert scheduler.schedule() is None  # everything in flight
    assert not set(first.slots.tolist()) & set(second.slots.tolist())
    land(table, first)
    third = scheduler.schedule()
    assert sorted(by_seq(table, third)) == [0, 1, 2]


def test_in_flight_sequences_are_never_rescheduled():
    table, scheduler = make_rank0(pp_size=4)
    scheduler.add(make_info(0, 3))
    batch = scheduler.schedule()
    scheduler.add(make_info(1, 3))
    other = scheduler.schedule()
    assert by_seq(table, other) == {1: (0, 3, True)}
    assert scheduler.schedule() is None
    land(table, batch)
    assert by_seq(table, scheduler.schedule()) == {0: (3, 1, True)}


def test_abort_requested_sequences_are_not_scheduled():
    table, scheduler = make_rank0()
    scheduler.add(make_info(0, 3))
    scheduler.add(make_info(1, 3))
    land(table, scheduler.schedule())
    table.request_abort(0)
    assert sorted(by_seq(table, scheduler.schedule())) == [1]


def test_remove_waiting():
    _, scheduler = make_rank0()
    info = make_info(0, 3)
    scheduler.add(info)
    assert scheduler.num_unfinished == 1
    assert scheduler.remove_waiting(info)
    assert not scheduler.remove_waiting(info)
    assert scheduler.schedule() is None and scheduler.num_unfinished == 0


def test_fcfs_small_request_does_not_overtake_waiting_head():
    # 4 blocks of 4 tokens; seq 0 holds 3 blocks while in flight
    table, scheduler = make_rank0(num_blocks=4, pp_size=2)
    scheduler.add(make_info(0, 12))
    first = scheduler.schedule()
    assert first.block_counts.tolist() == [3]
    scheduler.add(make_info(1, 8))  # needs 2 blocks: does not fit
    scheduler.add(make_info(2, 2))  # needs 1 block: would fit
    assert scheduler.schedule() is None
    assert [info.seq_id for info in scheduler.waiting] == [1, 2]
    assert table.num_active == 1


def test_admission_stops_when_slots_run_out():
    table, scheduler = make_rank0(max_slots=2)
    for seq_id in range(3):
        scheduler.add(make_info(seq_id, 2))
    batch = scheduler.schedule()
    assert sorted(by_seq(table, batch)) == [0, 1]
    assert [info.seq_id for info in scheduler.waiting] == [2]
    land(table, batch)
    table.release(0)
    batch = scheduler.schedule()
    assert by_seq(table, batch)[2] == (0, 2, True) and batch.admit_slots.tolist() == [0]


def test_decode_block_table_writes_only_at_page_boundaries():
    table, scheduler = make_rank0(block_size=4)
    scheduler.add(make_info(0, 3))
    scheduler.add(make_info(1, 4))
    batch = scheduler.schedule()
    counters = table.counters
    assert (counters.row_writes, counters.entry_writes) == (2, 0)
    land(table, batch)
    # seq 0 writes position 3 (inside block 0); seq 1 writes position 4 (a new page)
    before = counters.bytes_written
    batch = scheduler.schedule()
    assert batch.block_counts.tolist() == [0, 1]
    assert (counters.row_writes, counters.entry_writes) == (2, 1)
    assert counters.bytes_written == before + 4
    land(table, batch)
    entries = 1
    for _ in range(12):
        positions = table.num_computed[batch.slots].copy()  # next token's position
        crossing = positions % 4 == 0
        before_bytes = counters.bytes_written
        batch = scheduler.schedule()
        assert batch.block_counts.tolist() == crossing.astype(int).tolist()
        assert batch.block_ids.shape[0] == int(crossing.sum())
        entries += int(crossing.sum())
        assert (counters.row_writes, counters.entry_writes) == (2, entries)
        assert counters.bytes_written == before_bytes + 4 * int(crossing.sum())
        land(table, batch)
    assert entries == 1 + 6  # 13 decode steps over 4-token pages, for two sequences


def test_preemption_picks_latest_idle_and_recomputes_from_zero():
    # 4 blocks of 2 tokens. Seqs 0 and 1 (4-token prompts) take all four blocks.
    table, scheduler = make_rank0(num_blocks=4, block_size=2, token_table_len=32)
    scheduler.add(make_info(0, 4, max_tokens=2))
    scheduler.add(make_info(1, 4, max_tokens=8))
    batch = scheduler.schedule()
    assert table.blocks.num_free_blocks == 0
    land(table, batch, np.array([11, 21], dtype=np.int32))
    # both need a block to decode; seq 1 (latest arrival) gives its blocks up
    batch = scheduler.schedule()
    slot0, slot1 = scheduler.table.seq_id.tolist().index(0), table.seq_id.tolist().index(1)
    assert batch.preempt_slots.tolist() == [slot1]
    assert by_seq(table, batch) == {0: (4, 1, True)}
    assert table.num_computed[slot1] == 0 and table.num_blocks[slot1] == 0
    assert table.num_output[slot1] == 1 and table.active[slot1]
    land(table, batch, np.array([12], dtype=np.int32))
    # seq 0 reached max_tokens = 2 and finishes; seq 1 recomputes prompt + output
    assert table.output_tokens(slot0).tolist() == [11, 12]
    table.release(slot0)
    batch = scheduler.schedule()
    assert by_seq(table, batch) == {1: (0, 5, True)}
    assert batch.block_counts.tolist() == [3]
    assert table.counters.row_writes == 3  # two admissions + one rejoin
    land(table, batch, np.array([22], dtype=np.int32))
    assert table.output_tokens(slot1).tolist() == [21, 22]
    assert by_seq(table, scheduler.schedule()) == {1: (5, 1, True)}


def test_preempted_sequence_recompute_is_chunked_and_samples_at_the_end():
    table, scheduler = make_rank0(num_blocks=8, block_size=2, max_num_tokens=4)
    scheduler.add(make_info(0, 5))
    chunks = []
    for _ in range(4):  # prefill chunks 4 + 1, then two decodes
        batch = scheduler.schedule()
        chunks.append(by_seq(table, batch)[0])
        land(table, batch)
    assert chunks == [(0, 4, False), (4, 1, True), (5, 1, True), (6, 1, True)]
    assert table.num_output[0] == 3
    table.preempt(np.array([0], dtype=np.int32))  # as rank 0's scheduler would
    assert table.all_blocks_free()
    chunks = []
    for _ in range(3):
        batch = scheduler.schedule()
        chunks.append(by_seq(table, batch)[0])
        land(table, batch)
    # prompt (5) + outputs (3) are recomputed from 0 in budget-sized chunks
    assert chunks == [(0, 4, False), (4, 4, True), (8, 1, True)]
    assert table.num_output[0] == 5


def test_no_preemption_when_it_cannot_make_room():
    """Regression: rank 0 preempted an idle sequence, then scheduled nothing.

    schedule() returned None, so the preemption never reached the other ranks and
    their tables diverged. Preempting must only happen when the batch then fits.
    """
    table = SequenceTable(4, 16, BlockManager(8, 2))
    for seq_id, prompt_len in enumerate((20, 2, 8)):
        table.admit(make_info(seq_id, prompt_len), seq_id)
    table.append_blocks(
        np.arange(3, dtype=np.int32),
        np.array([2, 1, 4], dtype=np.int32),
        table.blocks.allocate(7),
    )
    two = np.array([0, 1], dtype=np.int32)
    table.start_batch(two, np.zeros(2, dtype=np.int32), np.array([4, 2], dtype=np.int32))
    table.land_batch(two, np.array([False, True]), np.array([-1, 3], dtype=np.int32))
    # seq 2 is in flight holding 4 blocks; seq 1 is idle holding 1; 1 block is free
    table.start_batch(
        np.array([2], dtype=np.int32), np.array([0], dtype=np.int32), np.array([8], dtype=np.int32)
    )
    scheduler = Scheduler(table, max_batch_size=8, max_num_tokens=8, pp_size=2)
    # seq 0's next chunk (8 tokens) needs 4 blocks: free + reclaimable = 2 is not enough
    assert scheduler.schedule() is None
    assert table.num_blocks.tolist()[:3] == [2, 1, 4]
    assert table.num_computed.tolist()[:3] == [4, 2, 8]
    assert table.blocks.num_free_blocks == 1
    # once seq 2 lands and is idle it can be preempted, and seq 0 proceeds
    table.land_batch(np.array([2], dtype=np.int32), np.array([True]), np.array([4], dtype=np.int32))
    batch = scheduler.schedule()
    assert batch.preempt_slots.tolist() == [2]
    assert by_seq(table, batch) == {0: (4, 8, False)}


# -- rank 0 / replica simulation ----------------------------------------------------
def assert_tables_equal(rank0: SequenceTable, replica: SequenceTable) -> None:
    for name in TABLE_ARRAYS:
        assert np.array_equal(getattr(rank0, name), getattr(replica, name)), name
    assert rank0._free_slots == replica._free_slots
    assert rank0.num_in_flight_batches == replica.num_in_flight_batches
    assert rank0.counters == replica.counters
    a, b = rank0.blocks, replica.blocks
    assert a.num_free_blocks == b.num_free_blocks
    assert np.array_equal(a._stack[: a.num_free_blocks], b._stack[: b.num_free_blocks])
    assert np.array_equal(a._is_free, b._is_free)
    for x, y in zip(rank0.infos, replica.infos):
        assert (x is None) == (y is None)
        if x is not None:
            assert x.seq_id == y.seq_id and x.slot == y.slot


def assert_block_invariants(table: SequenceTable) -> None:
    held = np.concatenate(
        [table.block_table[s, : table.num_blocks[s]] for s in range(table.max_slots)]
    )
    assert np.unique(held).shape[0] == held.shape[0], "a block is held twice"
    assert held.shape[0] + table.blocks.num_free_blocks == table.blocks.num_blocks
    assert not table.blocks._is_free[held].any()
    assert (table.num_blocks[~table.active] == 0).all()
    # every computed (or in-flight) token of a live sequence has a KV slot
    live = table.active
    assert (table.num_blocks[live] * table.block_size >= table.num_computed[live]).all()


class Simulation:
    """Rank 0 (table + scheduler) and one replica driven only by apply_schedule."""

    def __init__(
        self,
        rng,
        *,
        num_blocks,
        block_size,
        max_slots,
        max_batch_size,
        max_num_tokens,
        pp_size,
        max_prompt,
        max_output,
        abort_rate=0.0,
    ):
        self.rng = rng
        self.block_size = block_size
        self.max_num_tokens = max_num_tokens
        self.max_batch_size = max_batch_size
        self.pp_size = pp_size
        self.max_prompt, self.max_output = max_prompt, max_output
        self.abort_rate = abort_rate
        max_len = max_prompt + max_output
        assert max_len <= num_blocks * block_size
        max_blocks_per_seq = -(-max_len // block_size)
        self.table, self.scheduler = make_rank0(
            num_blocks,
            block_size,
            max_slots,
            max_blocks_per_seq,
            max_batch_size,
            max_num_tokens,
            pp_size,
            token_table_len=max_len,
        )
        self.replica = SequenceTable(
            max_slots, max_blocks_per_seq, BlockManager(num_blocks, block_size)
        )
        self.pending: dict[int, SeqInfo] = {}
        self.in_flight: deque[ScheduledBatch] = deque()
        self.buffer = np.zeros(
            microbatch_capacity(max_batch_size, max_num_tokens, block_size, max_slots),
            dtype=np.int32,
        )
        self.next_seq_id = 0
        self.iteration = 0
        self.outputs: dict[int, list[int]] = {}  # seq_id -> tokens sampled so far
        self.next_start: dict[int, int] = {}  # seq_id -> where its next chunk must start
        self.finished: set[int] = set()
        self.num_preemptions = 0
        self.num_chunked = 0
        self.max_in_flight = 0

    # arrivals -------------------------------------------------------------------
    def arrive(self) -> None:
        prompt_len = int(self.rng.integers(1, self.max_prompt + 1))
        max_tokens = int(self.rng.integers(1, self.max_output + 1))
        info = make_info(self.next_seq_id, prompt_len, max_tokens)
        self.scheduler.add(info)
        self.pending[info.seq_id] = copy_info(info)  # what the request broadcast carries
        self.outputs[info.seq_id] = []
        self.next_start[info.seq_id] = 0
        self.next_seq_id += 1

    # one schedule ---------------------------------------------------------------
    def schedule(self) -> ScheduledBatch | None:
        table = self.table
        unfinished = self.scheduler.num_unfinished
        cap = min(self.max_batch_size, max(1, -(-unfinished // self.pp_size)))
        waiting_before = [info.seq_id for info in self.scheduler.waiting]
        batch = self.scheduler.schedule()
        if batch is None:
            assert_tables_equal(table, self.replica)
            return None
        self.iteration += 1
        header = MicrobatchHeader(self.iteration, len(self.in_flight), False, False, batch)
        message = pack_microbatch(header, self.buffer)  # capacity must suffice
        received = unpack_microbatch(message.copy()).batch
        apply_schedule(self.replica, received, self.pending)
        assert_tables_equal(table, self.replica)
        assert_block_invariants(table)

        assert 0 < batch.num_seqs <= cap
        assert batch.num_tokens <= self.max_num_tokens
        assert (batch.num_new > 0).all()
        assert np.unique(batch.slots).shape[0] == batch.num_seqs
        for other in self.in_flight:
            assert not set(other.slots.tolist()) & set(batch.slots.tolist())
        # FCFS: admissions are a prefix of the waiting queue, in order
        admitted = batch.admit_seq_ids.tolist()
        assert admitted == waiting_before[: len(admitted)]
        for seq_id in admitted:
            assert seq_id not in self.pending
        for slot in batch.preempt_slots.tolist():
            self.next_start[int(table.seq_id[slot])] = 0
            self.num_preemptions += 1
        total = table.num_prompt[batch.slots] + table.num_output[batch.slots]
        for slot, start, num_new, sample, tot in zip(
            batch.slots.tolist(),
            batch.starts.tolist(),
            batch.num_new.tolist(),
            batch.sample_mask.tolist(),
            total.tolist(),
        ):
            seq_id = int(table.seq_id[slot])
            assert start == self.next_start[seq_id], "chunks must be contiguous"
            self.next_start[seq_id] = start + num_new
            assert start + num_new <= tot
            assert sample == (start + num_new == tot)
            if not sample:
                self.num_chunked += 1
        self.in_flight.append(batch)
        self.max_in_flight = max(self.max_in_flight, len(self.in_flight))
        return batch

    # the oldest batch comes back --------------------------------------------------
    def land_oldest(self) -> None:
        batch = self.in_flight.popleft()
        tokens = np.where(batch.sample_mask, self.rng.integers(0, 1000, batch.num_seqs), -1).astype(
            np.int32
        )
        finish = np.zeros(batch.num_seqs, dtype=np.int32)
        state = SampleState(batch.batch_id, batch.slots, batch.sample_mask, tokens, finish)
        received = unpack_sample_state(pack_sample_state(state).copy())
        self.table.land_batch(batch.slots, batch.sample_mask, tokens)
        self.replica.land_batch(received.slots, received.sampled, received.token_ids)
        table = self.table
        for slot, sampled, token in zip(
            batch.slots.tolist(), batch.sample_mask.tolist(), tokens.tolist()
        ):
            if not sampled:
                continue
            seq_id = int(table.seq_id[slot])
            self.outputs[seq_id].append(token)
            assert table.output_tokens(slot).tolist() == self.outputs[seq_id]
            info = table.infos[slot]
            early_stop = self.rng.random() < 0.05
            if len(self.outputs[seq_id]) >= info.params.max_tokens or early_stop:
                self.finish(slot)
        # aborts: flag a random idle sequence; release flagged idle ones
        if self.abort_rate and self.rng.random() < self.abort_rate:
            candidates = np.flatnonzero(table.active & ~table.abort_requested)
            if candidates.shape[0]:
                slot = int(self.rng.choice(candidates))
                table.request_abort(slot)
                self.replica.request_abort(slot)
        for slot in np.flatnonzero(table.abort_requested & table.active & ~table.in_flight):
            self.finish(int(slot))
        if self.abort_rate and self.scheduler.waiting and self.rng.random() < self.abort_rate:
            info = self.scheduler.waiting[-1]
            assert self.scheduler.remove_waiting(info)
            del self.pending[info.seq_id]
            self.finished.add(info.seq_id)
        assert_tables_equal(table, self.replica)
        assert_block_invariants(table)

    def finish(self, slot: int) -> None:
        info = self.table.release(slot)
        other = self.replica.release(slot)
        assert info.seq_id == other.seq_id
        self.finished.add(info.seq_id)

    # driver -------------------------------------------------------------------------
    def step(self) -> bool:
        """Schedule if the pipeline has room, else land the oldest. False if idle."""
        if len(self.in_flight) < self.pp_size and self.schedule() is not None:
            return True
        if self.in_flight:
            self.land_oldest()
            return True
        return False

    def run(self, num_steps: int, arrival_rate: float) -> None:
        for _ in range(num_steps):
            for _ in range(int(self.rng.poisson(arrival_rate))):
                self.arrive()
            self.step()
        self.drain()

    def drain(self) -> None:
        idle_limit = 100_000
        while self.step():
            idle_limit -= 1
            assert idle_limit > 0, "no progress: livelock"
        assert not self.scheduler.waiting, "requests left waiting with an idle pipeline"
        assert self.table.num_active == 0
        assert self.table.all_blocks_free() and self.replica.all_blocks_free()
        assert not self.pending
        assert self.finished == set(range(self.next_seq_id))
        assert_tables_equal(self.table, self.replica)


CONFIGS = {
    "roomy_pp1": dict(
        num_blocks=256,
        block_size=4,
        max_slots=16,
        max_batch_size=8,
        max_num_tokens=32,
        pp_size=1,
        max_prompt=40,
        max_output=12,
    ),
    "roomy_pp2": dict(
        num_blocks=256,
        block_size=4,
        max_slots=16,
        max_batch_size=8,
        max_num_tokens=32,
        pp_size=2,
        max_prompt=40,
        max_output=12,
    ),
    "scarce_pp1": dict(
        num_blocks=14,
        block_size=4,
        max_slots=8,
        max_batch_size=6,
        max_num_tokens=24,
        pp_size=1,
        max_prompt=30,
        max_output=20,
    ),
    "scarce_pp2": dict(
        num_blocks=16,
        block_size=4,
        max_slots=8,
        max_batch_size=6,
        max_num_tokens=24,
        pp_size=2,
        max_prompt=30,
        max_output=20,
    ),
    "scarce_pp3": dict(
        num_blocks=20,
        block_size=2,
        max_slots=12,
        max_batch_size=4,
        max_num_tokens=16,
        pp_size=3,
        max_prompt=20,
        max_output=16,
    ),
    "scarce_pp4": dict(
        num_blocks=24,
        block_size=4,
        max_slots=16,
        max_batch_size=8,
        max_num_tokens=20,
        pp_size=4,
        max_prompt=40,
        max_output=24,
        abort_rate=0.03,
    ),
    "tiny_budget_pp4": dict(
        num_blocks=64,
        block_size=1,
        max_slots=6,
        max_batch_size=3,
        max_num_tokens=3,
        pp_size=4,
        max_prompt=9,
        max_output=6,
        abort_rate=0.05,
    ),
}


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_replica_replays_rank0_exactly(name, seed):
    config = CONFIGS[name]
    sim = Simulation(np.random.default_rng(seed), **config)
    sim.run(num_steps=500, arrival_rate=0.4)
    assert sim.next_seq_id > 50
    assert sim.max_in_flight == config["pp_size"]
    assert sim.num_chunked > 0
    if name.startswith("scarce"):
        assert sim.num_preemptions > 0


def test_burst_of_arrivals_drains_with_scarce_blocks():
    sim = Simulation(np.random.default_rng(7), **CONFIGS["scarce_pp2"])
    for _ in range(40):
        sim.arrive()
    sim.drain()
    assert sim.num_preemptions > 0


# -- skipping work that cannot produce a batch ----------------------------------------
def count_picks(monkeypatch, scheduler: Scheduler) -> list[int]:
    calls = []
    original = scheduler._pick_running

    def counted(cap):
        calls.append(cap)
        return original(cap)

    monkeypatch.setattr(scheduler, "_pick_running", counted)
    return calls


def test_scheduler_skips_until_something_changes(monkeypatch):
    table, scheduler = make_rank0(max_batch_size=8)
    picks = count_picks(monkeypatch, scheduler)
    scheduler.add(make_info(0, 3))
    first = scheduler.schedule()
    assert first is not None and len(picks) == 1
    # everything is in flight and nothing waits: further calls do no work
    assert scheduler.schedule() is None and scheduler.schedule() is None
    assert len(picks) == 1
    scheduler.add(make_info(1, 3))  # a new request is a change
    assert by_seq(table, scheduler.schedule()) == {1: (0, 3, True)}
    assert scheduler.schedule() is None
    calls = len(picks)
    land(table, first)  # a landed batch is a change
    assert by_seq(table, scheduler.schedule()) == {0: (3, 1, True)}
    assert len(picks) == calls + 1


def test_scheduler_does_not_skip_while_ready_sequences_were_left_out():
    table, scheduler = make_rank0(max_batch_size=2)
    for seq_id in range(3):
        scheduler.add(make_info(seq_id, 3))
    first = scheduler.schedule()
    assert sorted(by_seq(table, first)) == [0, 1]
    second = scheduler.schedule()  # the third request was left out by the cap
    assert sorted(by_seq(table, second)) == [2]
    land(table, first)
    land(table, second)
    # all three ready again, cap 2: the one left out comes in the next call
    assert len(by_seq(table, scheduler.schedule())) == 2
    assert len(by_seq(table, scheduler.schedule())) == 1
    assert scheduler.schedule() is None


def test_an_abort_request_counts_and_release_clears_it():
    table, scheduler = make_rank0()
    scheduler.add(make_info(0, 3))
    batch = scheduler.schedule()
    slot = int(batch.slots[0])
    version = table.version
    table.request_abort(slot)
    table.request_abort(slot)  # twice is once
    assert table.num_abort_requested == 1 and table.version == version + 1
    land(table, batch)
    table.release(slot)
    assert table.num_abort_requested == 0 and not table.abort_requested[slot]


def test_release_many_frees_like_single_releases():
    def filled():
        table, scheduler = make_rank0(num_blocks=40, block_size=4)
        for seq_id in range(4):
            scheduler.add(make_info(seq_id, 5 + 3 * seq_id))
        land(table, scheduler.schedule())
        return table

    one_by_one, together = filled(), filled()
    for slot in (2, 0, 3):
        one_by_one.release(slot)
    together.release_many([2, 0, 3])
    for name in TABLE_ARRAYS:
        if name != "block_table":
            assert np.array_equal(getattr(one_by_one, name), getattr(together, name)), name
    assert one_by_one.blocks.num_free_blocks == together.blocks.num_free_blocks
    assert together.has_free_slot() and together.next_free_slot() == 3
    with pytest.raises(AssertionError, match="not in use"):
        together.release_many([0])
    with pytest.raises(AssertionError, match="released twice"):
        together.release_many([1, 1])

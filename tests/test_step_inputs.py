"""StepInputPool.prepare against a direct per-token computation, over mixed batches.

The pool reuses what its buffers still hold (query_start_loc = 0..n after decode
steps), so the order of prefill and decode batches matters: this drives random
sequences of both through one pool.
"""

import numpy as np
import pytest
import torch

from ppruntime.engine.scheduler import ScheduledBatch
from ppruntime.stage.step_inputs import StepInputPool

BLOCK_SIZE = 4
MAX_SLOTS = 12
MAX_BLOCKS = 8
MAX_LEN = BLOCK_SIZE * MAX_BLOCKS


def make_batch(rng, decode: bool) -> ScheduledBatch:
    num_seqs = int(rng.integers(1, MAX_SLOTS + 1))
    slots = rng.permutation(MAX_SLOTS)[:num_seqs].astype(np.intp)
    lengths = np.ones(num_seqs) if decode else rng.integers(1, 6, num_seqs)
    num_new = lengths.astype(np.int32)
    starts = rng.integers(0, MAX_LEN - 6, num_seqs).astype(np.int32)
    sample_mask = np.ones(num_seqs, bool) if decode else rng.random(num_seqs) < 0.6
    empty = np.zeros(0, np.int32)
    return ScheduledBatch(
        batch_id=0,
        slots=slots,
        num_new=num_new,
        starts=starts,
        sample_mask=sample_mask,
        block_counts=np.zeros(num_seqs, np.int32),
        block_ids=empty,
        admit_seq_ids=np.zeros(0, np.int64),
        admit_slots=np.zeros(0, np.intp),
        preempt_slots=np.zeros(0, np.intp),
    )


def expected_inputs(batch, block_table, token_table):
    positions, slot_mapping, tokens, sample_index = [], [], [], []
    flat = 0
    for slot, start, count, sampled in zip(
        batch.slots.tolist(),
        batch.starts.tolist(),
        batch.num_new.tolist(),
        batch.sample_mask.tolist(),
    ):
        for position in range(start, start + count):
            positions.append(position)
            block = block_table[slot, position // BLOCK_SIZE]
            slot_mapping.append(block * BLOCK_SIZE + position % BLOCK_SIZE)
            tokens.append(token_table[slot, position])
        flat += count
        if sampled:
            sample_index.append(flat - 1)
    query_start_loc = np.concatenate([[0], np.cumsum(batch.num_new)])
    return {
        "positions": positions,
        "slot_mapping": slot_mapping,
        "token_ids": tokens,
        "sample_token_index": sample_index,
        "query_start_loc": query_start_loc.tolist(),
        "seq_lens": (batch.starts + batch.num_new).tolist(),
    }


@pytest.mark.parametrize("seed", range(4))
def test_prepare_matches_direct_computation_over_mixed_batches(seed):
    rng = np.random.default_rng(seed)
    block_table = rng.integers(0, 100, (MAX_SLOTS, MAX_BLOCKS)).astype(np.int32)
    token_table = rng.integers(0, 1000, (MAX_SLOTS, MAX_LEN)).astype(np.int32)
    pool = StepInputPool(
        block_table,
        np.zeros(MAX_SLOTS, bool),
        BLOCK_SIZE,
        64,
        MAX_SLOTS,
        token_table,
        torch.device("cpu"),
    )
    allocations = pool.counters.allocations
    for _ in range(60):
        batch = make_batch(rng, decode=rng.random() < 0.5)
        inputs = pool.prepare(batch)
        want = expected_inputs(batch, block_table, token_table)
        assert inputs.positions.tolist() == want["positions"]
        assert inputs.attn.slot_mapping.tolist() == want["slot_mapping"]
        assert inputs.token_ids.tolist() == want["token_ids"]
        assert inputs.sample_token_index.tolist() == want["sample_token_index"]
        assert inputs.attn.query_start_loc.tolist() == want["query_start_loc"]
        assert inputs.attn.seq_lens.tolist() == want["seq_lens"]
        assert inputs.attn.block_table_rows.tolist() == batch.slots.tolist()
        assert inputs.attn.max_query_len == int(batch.num_new.max())
        assert inputs.is_decode == bool((batch.num_new == 1).all())
    assert pool.counters.allocations == allocations  # no pooled buffer created per step


def _decode(slots: list[int], starts: list[int], continuing: list[int]) -> ScheduledBatch:
    batch = make_batch(np.random.default_rng(0), decode=True)
    count = len(slots)
    batch.slots = np.array(slots, np.intp)
    batch.starts = np.array(starts, np.int32)
    batch.num_new = np.ones(count, np.int32)
    batch.sample_mask = np.ones(count, bool)
    batch.block_counts = np.zeros(count, np.int32)
    batch.continuing = np.array(continuing, np.intp)
    return batch


@pytest.mark.parametrize(
    "slots, continuing",
    [
        ([3, 1, 7], [0, 1, 2]),  # steady decode: the step in flight's rows, in order
        ([1, 3, 7], [0, 1, 2]),  # the same rows, another order
        ([3, 7, 5], [0, 1]),  # a new row that is not continued
        ([3, 1], [0, 1]),  # a row of the step in flight left out
    ],
)
def test_carried_tokens_are_the_step_in_flights_samples_of_the_same_slot(slots, continuing):
    from types import SimpleNamespace

    from ppruntime.engine.overlap import StepOverlap

    block_table = np.arange(MAX_SLOTS * MAX_BLOCKS, dtype=np.int32).reshape(MAX_SLOTS, -1)
    token_table = np.arange(MAX_SLOTS * MAX_LEN, dtype=np.int32).reshape(MAX_SLOTS, -1)
    pool = StepInputPool(
        block_table,
        np.zeros(MAX_SLOTS, bool),
        BLOCK_SIZE,
        64,
        16,
        token_table,
        torch.device("cpu"),
    )
    overlap = StepOverlap(last_stage=None, max_slots=MAX_SLOTS)
    in_flight_slots = np.array([3, 1, 7], np.intp)
    sampled = torch.tensor([900, 901, 907], dtype=torch.int32)  # by in-flight row
    overlap.launched.append(
        SimpleNamespace(slots=in_flight_slots, on_device=SimpleNamespace(token_ids=sampled))
    )
    batch = _decode(slots, [5] * len(slots), continuing)
    carried = overlap.carried_tokens(batch)
    steady = slots == in_flight_slots.tolist() and len(continuing) == len(slots)
    assert (carried.sampled_rows is None) == steady  # the one-copy path only when in order
    inputs = pool.prepare(batch, carried=carried)
    sample_of_slot = {3: 900, 1: 901, 7: 907}
    expected = [
        sample_of_slot[slot] if row in continuing else int(token_table[slot, 5])
        for row, slot in enumerate(slots)
    ]
    assert inputs.token_ids.tolist() == expected

"""Round trips of the MICROBATCH and SAMPLE_STATE int32 wire formats."""

import numpy as np
import pytest

from ppruntime.engine import wire
from ppruntime.engine.block_manager import BlockManager
from ppruntime.engine.sampling_params import SamplingParams
from ppruntime.engine.scheduler import ScheduledBatch, Scheduler
from ppruntime.engine.seq_table import SeqInfo, SequenceTable
from ppruntime.engine.wire import (
    HEADER_LEN,
    MicrobatchHeader,
    SampleState,
    microbatch_capacity,
    pack_microbatch,
    pack_sample_state,
    unpack_microbatch,
    unpack_sample_state,
)

BATCH_FIELDS = (
    "slots",
    "num_new",
    "starts",
    "sample_mask",
    "block_counts",
    "block_ids",
    "admit_seq_ids",
    "admit_slots",
    "preempt_slots",
)


def i32(*values):
    return np.array(values, dtype=np.int32)


def slots(*values):
    return np.array(values, dtype=np.intp)


def make_batch(**overrides) -> ScheduledBatch:
    fields = dict(
        batch_id=7,
        slots=slots(3, 0, 5),
        num_new=i32(1, 12, 4),
        starts=i32(40, 0, 8),
        sample_mask=np.array([True, False, True]),
        block_counts=i32(0, 3, 1),
        block_ids=i32(9, 2, 11, 4),
        admit_seq_ids=np.array([17], dtype=np.int64),
        admit_slots=slots(0),
        preempt_slots=slots(6, 1),
    )
    fields.update(overrides)
    return ScheduledBatch(**fields)


def assert_batches_equal(a: ScheduledBatch, b: ScheduledBatch) -> None:
    assert a.batch_id == b.batch_id
    for name in BATCH_FIELDS:
        x, y = getattr(a, name), getattr(b, name)
        assert x.tolist() == y.tolist(), name
        assert x.dtype == y.dtype, name


def round_trip(header: MicrobatchHeader, capacity: int = 256) -> MicrobatchHeader:
    buffer = np.full(capacity, -7, dtype=np.int32)
    message = pack_microbatch(header, buffer)
    assert message.dtype == np.int32
    assert np.shares_memory(message, buffer)
    return unpack_microbatch(message.copy())


def test_batch_round_trip_with_activations():
    batch = make_batch()
    header = MicrobatchHeader(
        iteration=123,
        ready_count=2,
        shutdown=False,
        has_control=True,
        batch=batch,
        num_tokens=17,
        hidden_size=4096,
        dtype_code=wire.DTYPE_CODES[np.dtype(np.float16)],
    )
    got = round_trip(header)
    assert (got.iteration, got.ready_count, got.shutdown, got.has_control) == (123, 2, False, True)
    assert (got.num_tokens, got.hidden_size, got.dtype_code) == (17, 4096, 2)
    assert got.has_activations
    assert_batches_equal(got.batch, batch)
    assert got.batch.num_seqs == 3 and got.batch.num_tokens == 17


def test_message_length_is_header_plus_arrays():
    batch = make_batch()
    message = pack_microbatch(
        MicrobatchHeader(0, 0, False, False, batch), np.zeros(256, dtype=np.int32)
    )
    assert message.shape[0] == HEADER_LEN + 5 * 3 + 4 + 2 * 1 + 2


def test_batch_without_activations_drops_activation_fields():
    header = MicrobatchHeader(1, 0, False, False, make_batch(), num_tokens=17, hidden_size=0)
    got = round_trip(header)
    assert not got.has_activations
    assert (got.num_tokens, got.hidden_size, got.dtype_code) == (0, 0, 0)
    assert_batches_equal(got.batch, make_batch())


@pytest.mark.parametrize(
    "shutdown, control", [(False, False), (True, False), (False, True), (True, True)]
)
def test_header_only_messages(shutdown, control):
    buffer = np.full(64, 99, dtype=np.int32)
    message = pack_microbatch(MicrobatchHeader(5, 3, shutdown, control, None), buffer)
    assert message.shape == (HEADER_LEN,)
    got = unpack_microbatch(message)
    assert got.batch is None and not got.has_activations
    assert (got.iteration, got.ready_count, got.shutdown, got.has_control) == (
        5,
        3,
        shutdown,
        control,
    )


def test_stale_buffer_contents_do_not_leak_into_the_header():
    buffer = np.full(256, 1234, dtype=np.int32)
    pack_microbatch(MicrobatchHeader(1, 1, False, False, make_batch(), 17, 64, 1), buffer)
    message = pack_microbatch(MicrobatchHeader(2, 0, False, False, None), buffer)
    got = unpack_microbatch(message)
    assert got.batch is None and not got.shutdown and not got.has_control


def test_empty_arrays_round_trip():
    empty = np.zeros(0, dtype=np.int32)
    batch = make_batch(
        slots=slots(2),
        num_new=i32(1),
        starts=i32(9),
        sample_mask=np.array([True]),
        block_counts=i32(0),
        block_ids=empty,
        admit_seq_ids=np.zeros(0, dtype=np.int64),
        admit_slots=slots(),
        preempt_slots=slots(),
    )
    got = round_trip(MicrobatchHeader(0, 0, False, False, batch))
    assert_batches_equal(got.batch, batch)


def test_unpacked_arrays_are_copies():
    buffer = np.zeros(256, dtype=np.int32)
    message = pack_microbatch(MicrobatchHeader(0, 0, False, False, make_batch()), buffer)
    got = unpack_microbatch(message)
    buffer[:] = -1
    assert_batches_equal(got.batch, make_batch())


def test_too_small_buffer_fails_loudly():
    with pytest.raises(ValueError):
        pack_microbatch(
            MicrobatchHeader(0, 0, False, False, make_batch()), np.zeros(20, dtype=np.int32)
        )


def test_capacity_holds_the_largest_schedules():
    """Pack every batch of a busy, block-starved run into a capacity-sized buffer."""
    rng = np.random.default_rng(3)
    max_batch_size, max_num_tokens, block_size, max_slots = 6, 23, 2, 12
    table = SequenceTable(max_slots, 64, BlockManager(40, block_size))
    scheduler = Scheduler(table, max_batch_size, max_num_tokens, pp_size=1)
    capacity = microbatch_capacity(max_batch_size, max_num_tokens, block_size, max_slots)
    buffer = np.zeros(capacity, dtype=np.int32)
    largest = 0
    for seq_id in range(300):
        if rng.random() < 0.6:
            prompt = np.zeros(int(rng.integers(1, 40)), dtype=np.int32)
            scheduler.add(SeqInfo(seq_id, str(seq_id), prompt, SamplingParams()))
        batch = scheduler.schedule()
        if batch is None:
            continue
        message = pack_microbatch(MicrobatchHeader(seq_id, 0, False, False, batch), buffer)
        largest = max(largest, message.shape[0])
        assert_batches_equal(unpack_microbatch(message).batch, batch)
        table.land_batch(batch.slots, batch.sample_mask, np.zeros(batch.num_seqs, np.int32))
        for slot in batch.slots[batch.sample_mask].tolist():
            if table.num_output[slot] >= 4:
                table.release(slot)
    assert largest > HEADER_LEN + 5 * max_batch_size


def test_sample_state_round_trip():
    state = SampleState(
        batch_id=42,
        slots=i32(4, 1, 7),
        sampled=np.array([True, False, True]),
        token_ids=i32(1000, -1, 31999),
        finish=i32(wire.FINISH_NONE, wire.FINISH_NONE, wire.FINISH_STOP),
        has_diff=True,
    )
    message = pack_sample_state(state)
    assert message.dtype == np.int32 and message.shape == (3 + 4 * 3,)
    got = unpack_sample_state(message)
    assert got.batch_id == 42 and got.has_diff
    assert got.slots.tolist() == [4, 1, 7] and got.slots.dtype == np.intp
    assert got.sampled.dtype == np.bool_ and got.sampled.tolist() == [True, False, True]
    assert got.token_ids.tolist() == [1000, -1, 31999]
    assert got.finish.tolist() == [0, 0, 1]


def test_sample_state_empty_and_without_diff():
    empty = np.zeros(0, dtype=np.int32)
    state = SampleState(3, empty, np.zeros(0, dtype=np.bool_), empty, empty)
    got = unpack_sample_state(pack_sample_state(state))
    assert got.batch_id == 3 and not got.has_diff
    assert got.slots.shape == got.sampled.shape == got.token_ids.shape == got.finish.shape == (0,)


def test_finish_reason_codes():
    assert wire.FINISH_NONE == 0
    assert wire.FINISH_REASONS == {
        wire.FINISH_STOP: "stop",
        wire.FINISH_LENGTH: "length",
        wire.FINISH_ABORT: "abort",
        wire.FINISH_NONFINITE: "error",
    }


def test_dtype_codes_are_a_bijection():
    for dtype, code in wire.DTYPE_CODES.items():
        assert wire.DTYPES_BY_CODE[code] == dtype
    assert 0 not in wire.DTYPES_BY_CODE  # 0 means "no activations"

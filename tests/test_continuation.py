"""Async scheduling's pure parts: the table's continuable set and deferred release, and
the scheduler continuing sequences whose step is still in flight (no model, no MPI).

A simulated PP=1 loop (schedule k+1, then land k) with a "model" whose next token is a
function of the context checks that continued schedules produce exactly the tokens,
output counts and block usage of the synchronous loop.
"""

from __future__ import annotations

import numpy as np
import pytest

from ppruntime.engine.block_manager import BlockManager
from ppruntime.engine.sampling_params import SamplingParams
from ppruntime.engine.scheduler import ScheduledBatch, Scheduler
from ppruntime.engine.seq_table import SeqInfo, SequenceTable

I32 = np.int32


def make_info(seq_id: int, prompt_len: int, max_tokens: int = 16) -> SeqInfo:
    prompt = (np.arange(prompt_len, dtype=I32) * 7 + seq_id) % 1000
    return SeqInfo(seq_id, f"req-{seq_id}", prompt, SamplingParams(max_tokens=max_tokens))


def make(max_slots=8, num_blocks=64, block_size=4, max_model_len=None, continue_in_flight=True):
    table = SequenceTable(
        max_slots,
        32,
        BlockManager(num_blocks, block_size),
        token_table_len=128,
        max_model_len=max_model_len,
    )
    scheduler = Scheduler(table, 8, 64, 1, continue_in_flight=continue_in_flight)
    return table, scheduler


def land(table: SequenceTable, batch: ScheduledBatch, token: int = 5) -> np.ndarray:
    return table.land_batch(batch.slots, batch.sample_mask, np.full(batch.num_seqs, token, I32))


# -- SequenceTable ----------------------------------------------------------------------
def test_a_sequence_whose_step_samples_is_continuable_until_its_length_limit():
    table, scheduler = make()
    scheduler.add(make_info(0, 3, max_tokens=3))
    prefill = scheduler.schedule()
    assert table.steps_in_flight[0] == 1
    assert table.continuable()[0], "the prefill samples the first token"
    first = scheduler.schedule()  # output 2 of 3, before output 1 landed
    assert first.continuing.tolist() == [0] and first.starts.tolist() == [3]
    assert first.num_new.tolist() == [1] and first.sample_mask.tolist() == [True]
    assert table.steps_in_flight[0] == 2 and not table.continuable()[0]
    assert scheduler.schedule() is None, "at most two steps in flight"
    land(table, prefill)
    assert table.steps_in_flight[0] == 1 and table.in_flight[0] and table.continuable()[0]
    second = scheduler.schedule()  # output 3 of 3
    assert second.continuing.tolist() == [0] and second.starts.tolist() == [4]
    land(table, first)
    assert table.num_output[0] == 2 and table.steps_in_flight[0] == 1
    assert not table.continuable()[0], "its step in flight gives the last allowed token"
    assert scheduler.schedule() is None
    land(table, second)
    assert not table.in_flight[0] and table.num_output[0] == 3


def test_a_chunk_that_does_not_reach_the_end_is_not_continued():
    table = SequenceTable(4, 32, BlockManager(64, 4), token_table_len=64)
    scheduler = Scheduler(table, 8, 4, 1, continue_in_flight=True)  # chunks of 4 tokens
    scheduler.add(make_info(0, 10))
    chunk = scheduler.schedule()
    assert chunk.sample_mask.tolist() == [False]
    assert not table.continuable()[0] and scheduler.schedule() is None
    land(table, chunk)
    assert scheduler.schedule().starts.tolist() == [4]


def test_model_length_limits_continuation():
    table, scheduler = make(max_model_len=6)
    scheduler.add(make_info(0, 4, max_tokens=16))  # room for 2 outputs
    scheduler.schedule()
    assert table.output_limit[0] == 2
    assert table.continuable()[0]
    scheduler.schedule()
    assert not table.continuable()[0]


def test_abort_requested_and_awaiting_release_are_not_continuable():
    table, scheduler = make()
    for seq_id in range(3):
        scheduler.add(make_info(seq_id, 3))
    prefill = scheduler.schedule()
    table.request_abort(1)
    continued = scheduler.schedule()
    assert sorted(continued.slots.tolist()) == [0, 2]
    land(table, prefill)
    # sequence 2 finished at the prefill (say, eos) while `continued` computes it
    table.await_release([2])
    assert table.num_awaiting_release == 1 and table.releasable() == []
    assert not table.continuable()[2]
    after = scheduler.schedule()
    assert 2 not in after.slots.tolist() and 1 not in after.slots.tolist()
    land(table, continued)
    assert table.releasable() == [2]
    table.release_many([2])
    assert table.num_awaiting_release == 0 and not table.awaiting_release.any()


def test_await_release_consumes_a_pending_abort():
    table, scheduler = make()
    scheduler.add(make_info(0, 3))
    prefill = scheduler.schedule()
    continued = scheduler.schedule()
    table.request_abort(0)
    land(table, prefill)
    table.await_release([0])  # the abort landed: it must not finish it a second time
    assert not table.abort_requested[0] and table.num_abort_requested == 0
    land(table, continued)
    table.release_many(table.releasable())
    assert table.all_blocks_free()


def test_release_of_a_slot_in_flight_is_refused():
    table, scheduler = make()
    scheduler.add(make_info(0, 3))
    scheduler.schedule()
    with pytest.raises(AssertionError, match="in flight"):
        table.release_many([0])
    with pytest.raises(AssertionError, match="no step in flight"):
        table2, _ = make()
        table2.admit(make_info(0, 3), 0)
        table2.await_release([0])


def test_without_continuation_in_flight_sequences_wait():
    table, scheduler = make(continue_in_flight=False)
    scheduler.add(make_info(0, 3))
    scheduler.schedule()
    assert scheduler.schedule() is None
    with pytest.raises(ValueError, match="pp_size 1"):
        Scheduler(table, 8, 64, 2, continue_in_flight=True)


# -- a simulated PP=1 loop --------------------------------------------------------------
def _next_token(context: np.ndarray) -> int:
    """A deterministic stand-in for the model: depends on the whole context."""
    return int((context.astype(np.int64) * np.arange(1, context.shape[0] + 1)).sum() % 997) + 3


def _run(continue_in_flight: bool, requests, num_blocks: int, stop_every: int | None):
    """Drive the scheduler like the executor does; returns (outputs, max in flight,
    continued rows). A sequence also stops when it samples a multiple of stop_every."""
    table, scheduler = make(
        max_slots=8, num_blocks=num_blocks, continue_in_flight=continue_in_flight
    )
    pending = [make_info(i, length, max_tokens) for i, (length, max_tokens) in enumerate(requests)]
    for info in pending:
        scheduler.add(info)
    outputs: dict[int, list[int]] = {}
    in_flight: list[tuple[ScheduledBatch, np.ndarray]] = []
    finished: set[int] = set()
    most_in_flight = continued = 0
    device_tokens: dict[int, int] = {}  # slot -> sampled token not landed yet

    def land_oldest() -> None:
        batch, tokens = in_flight.pop(0)
        sampled = batch.sample_mask.copy()
        awaiting = table.awaiting_release[batch.slots]
        sampled &= ~awaiting  # discarded rows gain nothing
        gained = table.land_batch(batch.slots, sampled, tokens)
        done = []
        for slot in gained.tolist():
            seq_id = int(table.seq_id[slot])
            outputs.setdefault(seq_id, []).append(int(table.output_tokens(slot)[-1]))
            info = table.infos[slot]
            count = int(table.num_output[slot])
            stopped = stop_every is not None and outputs[seq_id][-1] % stop_every == 0
            if count >= info.params.max_tokens or stopped:
                done.append(slot)
        for slot in done:
            finished.add(int(table.seq_id[slot]))
            if table.in_flight[slot]:
                table.await_release([slot])
            else:
                table.release_many([slot])
        if table.releasable():
            table.release_many(table.releasable())

    for _ in range(10_000):
        if len(finished) == len(requests):
            break
        batch = scheduler.schedule() if len(in_flight) < 2 else None
        if batch is not None:
            continued += batch.continuing.shape[0]
            carried = set(batch.continuing.tolist())
            tokens = np.full(batch.num_seqs, -1, I32)
            for row, slot in enumerate(batch.slots.tolist()):
                if not batch.sample_mask[row]:
                    continue
                known = int(table.num_prompt[slot] + table.num_output[slot])
                context = table.token_table[slot, :known]
                if row in carried:  # the input token is the step in flight's sample
                    context = np.append(context, device_tokens[slot])
                assert context.shape[0] == batch.starts[row] + batch.num_new[row]
                tokens[row] = _next_token(context)
                device_tokens[slot] = int(tokens[row])
            in_flight.append((batch, tokens))
            most_in_flight = max(most_in_flight, len(in_flight))
        if in_flight and (batch is None or len(in_flight) > 1 or not continue_in_flight):
            land_oldest()
    else:
        raise AssertionError("the loop never finished")
    while in_flight:
        land_oldest()
    assert table.all_blocks_free() and not table.active.any()
    return outputs, most_in_flight, continued


@pytest.mark.parametrize(
    "requests, num_blocks, stop_every",
    [
        ([(3, 8), (5, 1), (1, 12), (9, 4)], 64, None),
        ([(3, 20), (5, 20), (7, 20), (2, 20), (6, 20)], 64, 5),
        ([(6, 10), (6, 10), (6, 10), (6, 10)], 12, None),  # preemption
    ],
)
def test_continued_schedules_give_the_synchronous_tokens(requests, num_blocks, stop_every):
    sync, sync_in_flight, _ = _run(False, requests, num_blocks, stop_every)
    overlapped, most, continued = _run(True, requests, num_blocks, stop_every)
    assert overlapped == sync
    if stop_every is not None:  # some stopped before max_tokens
        assert any(
            len(tokens) < max_tokens
            for (_, max_tokens), tokens in zip(requests, [sync[i] for i in range(len(requests))])
        )
    assert sync_in_flight == 1 and most == 2 and continued > 0

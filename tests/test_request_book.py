"""Rank 0's request book (pure bookkeeping: no MPI, no model)."""

import numpy as np
import pytest

from ppruntime.engine.block_manager import BlockManager
from ppruntime.engine.errors import InvalidRequestError
from ppruntime.engine.outputs import OutputCollector
from ppruntime.engine.request_book import RequestBook
from ppruntime.engine.sampling_params import SamplingParams
from ppruntime.engine.seq_table import SequenceTable
from ppruntime.engine.wire import FINISH_ABORT


def make_book() -> RequestBook:
    table = SequenceTable(4, 8, BlockManager(16, 4), token_table_len=32)
    return RequestBook(OutputCollector(table, tokenizer=None))


def prompt(*ids: int) -> np.ndarray:
    return np.array(ids, dtype=np.int32)


def test_new_requests_and_aborts_travel_as_one_control_then_the_queues_are_empty():
    book = make_book()
    assert book.take_control() == (None, [])
    book.add("a", prompt(1, 2, 3), SamplingParams(max_tokens=2), stream=False)
    book.add("b", prompt(4), SamplingParams(max_tokens=2), stream=True)
    assert book.abort("a") and book.has_control
    control, infos = book.take_control()
    assert [info.request_id for info in infos] == ["a", "b"]
    assert control.new.seq_ids.tolist() == [0, 1]
    assert control.new.prompt_lengths.tolist() == [3, 1]
    assert control.new.prompt_tokens.tolist() == [1, 2, 3, 4]
    assert control.aborts == [book.seq_id_of("a")]
    assert not book.has_control and book.take_control() == (None, [])


def test_ids_are_unique_while_unfinished_and_free_again_after_the_finish():
    book = make_book()
    book.add("a", prompt(1), SamplingParams(max_tokens=1), stream=True)
    with pytest.raises(InvalidRequestError, match="request_id 'a' is already in use"):
        book.add("a", prompt(1), SamplingParams(max_tokens=1), stream=False)
    assert not book.abort("unknown")
    assert book.abort("a") and not book.abort("a")  # queued once
    (info,) = book.take_control()[1]
    book.on_finish(info, FINISH_ABORT)  # aborted before it was ever scheduled
    assert not book.has("a") and book.num_unfinished == 0
    (output,) = book.take_finished()
    assert output.request_id == "a" and output.finish_reason == "abort"
    assert [event.request_id for event in book.take_events()] == ["a"]  # its last delta
    assert book.take_finished() == [] and book.take_events() == []
    book.add("a", prompt(1), SamplingParams(max_tokens=1), stream=False)  # the id is free
    assert book.seq_id_of("a") == 1


def test_abort_all_queues_every_unfinished_request_once():
    book = make_book()
    for request_id in ("x", "y", "z"):
        book.add(request_id, prompt(7), SamplingParams(max_tokens=1), stream=False)
    book.abort("y")
    book.abort_all()
    control, _ = book.take_control()
    assert sorted(control.aborts) == [0, 1, 2]

"""The control message (new requests + cancellations) round-trips as numbers."""

from __future__ import annotations

import numpy as np
import pytest

from ppruntime.engine.control import (
    FIELDS,
    H_PROMPT_TOKENS,
    HEADER,
    Control,
    NewRequests,
    _decode,
    _encode,
    isend_control,
    recv_control,
)
from ppruntime.engine.sampling_params import SamplingParams

PARAMS = [
    SamplingParams(),
    SamplingParams(max_tokens=7, temperature=0.0, ignore_eos=True, logprobs=0),
    SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, seed=2**63 - 1, logprobs=3),
    SamplingParams(top_k=2**40, temperature=0.5),  # capped to int32: keeps every token
    # SamplingParams takes seeds in [0, 2**63); the message still carries any int
    SamplingParams.trusted(seed=2**70, prompt_logits=True, generation_logits=True),
    SamplingParams(stop=("end", "\n"), stop_token_ids=[2, 9], seed=12345),
]


def _new(params: list[SamplingParams]) -> NewRequests:
    lengths = np.arange(1, len(params) + 1, dtype=np.int64) * 3
    return NewRequests(
        seq_ids=np.arange(100, 100 + len(params), dtype=np.int64),
        request_ids=[f"req-{i}" for i in range(len(params))],
        prompt_lengths=lengths,
        prompt_tokens=np.arange(int(lengths.sum()), dtype=np.int32),
        params=params,
    )


@pytest.mark.parametrize("with_extras", [False, True])
def test_round_trip(with_extras: bool) -> None:
    params = PARAMS if with_extras else PARAMS[:4]
    control = Control(new=_new(params), aborts=[3, 4])
    message, extras = _encode(control)
    assert message.dtype == np.int32 and bool(extras) == with_extras
    # the prompts travel in their own message, not copied into this one
    assert message.shape[0] == HEADER + FIELDS * len(params) + 2
    assert message[H_PROMPT_TOKENS] == control.new.prompt_tokens.shape[0]
    back = _decode(message.copy(), extras, control.new.prompt_tokens.copy())
    assert_same_control(back, control)


def assert_same_control(back: Control, control: Control) -> None:
    assert back.aborts == control.aborts
    assert back.new.seq_ids.tolist() == control.new.seq_ids.tolist()
    assert len(back.new.infos()) == len(control.new.infos())
    for ours, theirs in zip(back.new.infos(), control.new.infos()):
        assert ours.seq_id == theirs.seq_id
        np.testing.assert_array_equal(ours.prompt_token_ids, theirs.prompt_token_ids)
        for name in (
            "max_tokens",
            "top_k",
            "seed",
            "stop",
            "stop_token_ids",
            "ignore_eos",
            "logprobs",
            "prompt_logits",
            "generation_logits",
        ):
            assert getattr(ours.params, name) == getattr(theirs.params, name), name
        for name in ("temperature", "top_p", "min_p"):  # float32 on the wire, like the sampler
            assert np.float32(getattr(ours.params, name)) == np.float32(
                getattr(theirs.params, name)
            )


def test_cancellations_only() -> None:
    message, extras = _encode(Control(new=None, aborts=[7]))
    assert message[H_PROMPT_TOKENS] == 0  # no prompt message follows
    back = _decode(message, extras, np.zeros(0, np.int32))
    assert back.new is None and back.aborts == [7]


@pytest.mark.parametrize("with_extras", [False, True])
def test_send_and_receive_through_mpi(with_extras: bool) -> None:
    from mpi4py import MPI

    comm = MPI.COMM_SELF.Dup()
    try:
        for control in (
            Control(new=_new(PARAMS if with_extras else PARAMS[:4]), aborts=[3, 4]),
            Control(new=None, aborts=[5]),
        ):
            keep: list[object] = []
            requests = isend_control(comm, control, 0, keep)
            back = recv_control(comm, 0)
            MPI.Request.Waitall(requests)
            if control.new is None:
                assert back.new is None and back.aborts == [5]
            else:
                assert_same_control(back, control)
    finally:
        comm.Free()

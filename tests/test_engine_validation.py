"""Bad input through the Python API: `InvalidRequestError` naming the field and the value,
and nothing else lost: requests already submitted complete with the right tokens."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ppruntime import LLM, SamplingParams
from ppruntime.engine.errors import InvalidRequestError

MAX_MODEL_LEN = 64
VOCAB = 512  # the tiny preset's
GOOD_PROMPTS = ["hello", [256, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14]]
GOOD = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm():
    engine = LLM(preset="tiny", deterministic=True, block_size=4, max_model_len=MAX_MODEL_LEN)
    yield engine
    reports = engine.shutdown()
    assert reports[0].kv_blocks_free == reports[0].kv_blocks_total


@pytest.fixture(scope="module")
def expected(llm):
    """The good prompts' tokens when nothing goes wrong."""
    assert llm.vocab_size == VOCAB and llm.max_model_len == MAX_MODEL_LEN
    return [output.token_ids for output in llm.generate(GOOD_PROMPTS, GOOD, use_tqdm=False)]


def _params(**kwargs):
    return lambda: SamplingParams(**kwargs)


_DEFAULT = object()


def _mutated(**fields) -> SamplingParams:
    """Valid when built, made invalid afterwards (the engine must check again)."""
    params = SamplingParams(max_tokens=4, temperature=0)
    for name, value in fields.items():
        setattr(params, name, value)
    return params


def _add(prompt=_DEFAULT, params=GOOD):
    """A bad add_request: the prompt, or the SamplingParams built inside the call."""

    def call(llm):
        llm.add_request(
            "hello" if prompt is _DEFAULT else prompt, params() if callable(params) else params
        )

    return call


def _generate(prompts, params):
    def call(llm):
        llm.generate(prompts, params() if callable(params) else params, use_tqdm=False)

    return call


# (case id, call, substrings the message must contain: the field and the value)
CASES = [
    ("empty-text", _add(""), ["prompt", "empty"]),
    ("empty-ids", _add([]), ["prompt_token_ids", "empty"]),
    ("empty-array", _add(np.zeros(0, dtype=np.int64)), ["prompt_token_ids", "empty"]),
    ("negative-id", _add([256, 5, -3, 7]), ["prompt_token_ids[2]", "-3"]),
    ("id-vocab", _add([256, VOCAB]), ["prompt_token_ids[1]", str(VOCAB), "vocab"]),
    ("id-huge-array", _add(np.array([1, 2, 10**6])), ["prompt_token_ids[2]", "1000000"]),
    ("float-ids", _add([1.0, 2.0]), ["prompt_token_ids", "float"]),
    ("float-array", _add(np.array([1.5, 2.5])), ["prompt_token_ids", "float"]),
    ("bool-ids", _add([True, False]), ["prompt_token_ids", "bool"]),
    ("nested-ids", _add([[1, 2], [3, 4]]), ["prompt_token_ids", "(2, 2)"]),
    ("ragged-ids", _add([[1], [2, 3]]), ["prompt_token_ids", "nested"]),
    ("int-prompt", _add(7), ["prompt_token_ids", "int"]),
    ("none-prompt", _add(None), ["prompt_token_ids", "NoneType"]),
    (
        "prompt-too-long",
        _add(list(range(3, 3 + MAX_MODEL_LEN))),
        ["prompt_token_ids", str(MAX_MODEL_LEN), "max_model_len"],
    ),
    ("max-tokens-0", _add(params=_params(max_tokens=0)), ["max_tokens", "0"]),
    ("max-tokens-neg", _add(params=_params(max_tokens=-5)), ["max_tokens", "-5"]),
    ("max-tokens-float", _add(params=_params(max_tokens=2.5)), ["max_tokens", "2.5"]),
    (
        "max-tokens-too-many",
        _add(params=_params(max_tokens=MAX_MODEL_LEN)),
        ["max_tokens", str(MAX_MODEL_LEN), "max_model_len"],
    ),
    ("temperature-neg", _add(params=_params(temperature=-0.5)), ["temperature", "-0.5"]),
    ("temperature-nan", _add(params=_params(temperature=math.nan)), ["temperature", "nan"]),
    ("temperature-inf", _add(params=_params(temperature=math.inf)), ["temperature", "inf"]),
    ("temperature-str", _add(params=_params(temperature="hot")), ["temperature", "hot"]),
    ("top-p-0", _add(params=_params(top_p=0.0)), ["top_p", "0"]),
    ("top-p-1.5", _add(params=_params(top_p=1.5)), ["top_p", "1.5"]),
    ("top-p-nan", _add(params=_params(top_p=math.nan)), ["top_p", "nan"]),
    ("top-k--2", _add(params=_params(top_k=-2)), ["top_k", "-2"]),
    ("top-k-float", _add(params=_params(top_k=3.5)), ["top_k", "3.5"]),
    ("min-p-1.5", _add(params=_params(min_p=1.5)), ["min_p", "1.5"]),
    ("min-p-neg", _add(params=_params(min_p=-0.1)), ["min_p", "-0.1"]),
    ("logprobs-21", _add(params=_params(logprobs=21)), ["logprobs", "21"]),
    ("logprobs-neg", _add(params=_params(logprobs=-1)), ["logprobs", "-1"]),
    ("seed-float", _add(params=_params(seed=1.5)), ["seed", "1.5"]),
    ("seed-str", _add(params=_params(seed="42")), ["seed", "42"]),
    ("stop-ints", _add(params=_params(stop=[1, 2])), ["stop", "[1, 2]"]),
    ("stop-empty-string", _add(params=_params(stop=[""])), ["stop", "''"]),
    ("stop-bytes", _add(params=_params(stop=b"ab")), ["stop", "b'ab'"]),
    (
        "stop-token-ids-vocab",
        _add(params=_params(stop_token_ids=[3, VOCAB])),
        ["stop_token_ids", str(VOCAB)],
    ),
    ("stop-token-ids-neg", _add(params=_params(stop_token_ids=[-1])), ["stop_token_ids", "-1"]),
    ("stop-token-ids-str", _add(params=_params(stop_token_ids="12")), ["stop_token_ids", "12"]),
    ("ignore-eos-str", _add(params=_params(ignore_eos="yes")), ["ignore_eos", "yes"]),
    ("float-tensor", _add(torch.tensor([1.0, 2.0])), ["prompt_token_ids", "float32"]),
    ("2d-array", _add(np.ones((2, 3), dtype=np.int32)), ["prompt_token_ids", "(2, 3)"]),
    ("mutated-params", _add(params=lambda: _mutated(temperature=-2.0)), ["temperature", "-2"]),
    ("mutated-top-k", _add(params=lambda: _mutated(top_k=-7)), ["top_k", "-7"]),
    ("params-str", _add(params="greedy"), ["sampling_params", "str"]),
    ("params-dict", _add(params={"temperature": 0}), ["sampling_params", "dict"]),
    (
        "generate-params-count",
        _generate(["a", "b", "c"], [GOOD, GOOD]),
        ["3 prompts", "2 sampling params"],
    ),
    (
        "generate-one-bad-prompt",
        _generate(["a", [256, VOCAB + 7], "c"], GOOD),
        ["prompt 1", "prompt_token_ids[1]", str(VOCAB + 7)],
    ),
    (
        "generate-one-bad-param",
        _generate(["a", "b"], [GOOD, SamplingParams(max_tokens=63)]),
        ["prompt 1", "max_tokens", "63"],
    ),
    ("generate-params-str", _generate(["a"], ["x"]), ["prompt 0", "sampling_params", "str"]),
    ("stream-none", lambda llm: llm.add_request("hello", GOOD, stream=None), ["stream", "None"]),
    (
        "max-tokens-2**40",
        _add(params=_params(max_tokens=2**40)),
        ["max_tokens", str(2**40), "max_model_len"],
    ),
]


@pytest.mark.parametrize("call,needles", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_rejected_and_running_requests_go_on(llm, expected, call, needles):
    running = [llm.add_request(prompt, GOOD) for prompt in GOOD_PROMPTS]
    llm.step()  # the good requests are admitted and in flight
    with pytest.raises(InvalidRequestError) as excinfo:
        call(llm)
    message = str(excinfo.value)
    for needle in needles:
        assert needle in message, f"{needle!r} not in {message!r}"

    finished = {}
    for _ in range(1000):
        done, _ = llm.step()
        finished.update((output.request_id, output) for output in done)
        if not llm._executor.has_unfinished():
            break
    # the bad call queued nothing: only the good requests ran, and they ran right
    assert sorted(finished) == sorted(running)
    for request_id, tokens in zip(running, expected):
        assert finished[request_id].finish_reason == "length"
        assert finished[request_id].token_ids == tokens
    assert llm._executor.table.all_blocks_free()


def test_at_least_twelve_distinct_cases():
    assert len({case_id for case_id, _, _ in CASES}) >= 12


def test_duplicate_request_id_is_rejected(llm, expected):
    first = llm.add_request("hello", GOOD, request_id="dup")
    with pytest.raises(InvalidRequestError, match="request_id 'dup'"):
        llm.add_request([256, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14], GOOD, request_id="dup")
    outputs = {}
    while llm._executor.has_unfinished():
        done, _ = llm.step()
        outputs.update((output.request_id, output) for output in done)
    assert list(outputs) == [first]
    assert outputs[first].token_ids == expected[0]


def _run_to_completion(llm) -> dict:
    outputs = {}
    while llm._executor.has_unfinished():
        done, _ = llm.step()
        outputs.update((output.request_id, output) for output in done)
    return outputs


def test_prompt_buffer_reused_by_the_caller_does_not_change_the_request(llm, expected):
    buffer = np.array(GOOD_PROMPTS[1], dtype=np.int32)
    request_id = llm.add_request(buffer, GOOD)
    buffer[:] = 3  # the caller fills its buffer with the next prompt before stepping
    llm.step()
    buffer[:] = 4
    output = _run_to_completion(llm)[request_id]
    assert output.prompt_token_ids == GOOD_PROMPTS[1]
    assert output.token_ids == expected[1]


def test_top_k_beyond_int32_keeps_every_token(llm):
    prompt = [256, 5, 6, 7]
    sampled = {}
    for top_k in (0, 2**40):
        params = SamplingParams(max_tokens=8, temperature=1.0, seed=11, top_k=top_k)
        request_id = llm.add_request(prompt, params)
        sampled[top_k] = _run_to_completion(llm)[request_id].token_ids
    assert len(sampled[0]) == 8 and sampled[2**40] == sampled[0]

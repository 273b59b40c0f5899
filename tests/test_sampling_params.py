import math
import pickle

import numpy as np
import pytest
import torch

from ppruntime.engine.errors import InvalidRequestError
from ppruntime.engine.sampling_params import (
    MAX_LOGPROBS,
    SamplingParams,
    validate_prompt_token_ids,
)

BAD_PARAMS = [
    ("max_tokens", 0),
    ("max_tokens", -3),
    ("max_tokens", 2.0),
    ("max_tokens", True),
    ("max_tokens", np.True_),
    ("max_tokens", "16"),
    ("temperature", -0.1),
    ("temperature", math.nan),
    ("temperature", math.inf),
    ("temperature", "hot"),
    ("temperature", True),
    ("top_k", -2),
    ("top_k", 2.5),
    ("top_k", None),
    ("top_p", 0.0),
    ("top_p", 1.5),
    ("top_p", -0.2),
    ("top_p", math.nan),
    ("min_p", -0.1),
    ("min_p", 1.01),
    ("min_p", "0.1"),
    ("seed", 1.5),
    ("seed", True),
    ("seed", np.False_),
    ("seed", "42"),
    ("logprobs", -1),
    ("logprobs", MAX_LOGPROBS + 1),
    ("logprobs", 2.0),
    ("logprobs", False),
    ("stop", 5),
    ("stop", ["ok", 3]),
    ("stop", [""]),
    ("stop", ""),
    ("stop", b"bytes"),
    ("stop_token_ids", [1, -2]),
    ("stop_token_ids", [1, 2.0]),
    ("stop_token_ids", "12"),
    ("stop_token_ids", 7),
    ("ignore_eos", 1),
    ("prompt_logits", "yes"),
    ("generation_logits", None),
]


@pytest.mark.parametrize(("field", "value"), BAD_PARAMS)
def test_invalid_sampling_params_name_the_field(field, value):
    with pytest.raises(InvalidRequestError) as excinfo:
        SamplingParams(**{field: value})
    assert f"SamplingParams.{field}" in str(excinfo.value)
    assert isinstance(excinfo.value, ValueError)


def test_top_p_message_format():
    with pytest.raises(
        InvalidRequestError, match=r"SamplingParams.top_p must be in \(0, 1\], got 1.5"
    ):
        SamplingParams(top_p=1.5)


def test_defaults_and_normalisation():
    params = SamplingParams()
    assert params.max_tokens == 16 and params.temperature == 1.0 and params.top_k == 0
    assert params.top_p == 1.0 and params.min_p == 0.0 and params.seed is None
    assert params.stop == () and params.stop_token_ids == () and params.logprobs is None
    assert not params.is_greedy
    assert SamplingParams(temperature=0).is_greedy
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")
    assert SamplingParams(stop_token_ids=np.array([3, 4])).stop_token_ids == (3, 4)
    assert SamplingParams(top_k=-1, seed=np.int64(7), logprobs=0).seed == 7
    assert type(SamplingParams(temperature=1).temperature) is float


def test_pickle_round_trip():
    params = SamplingParams(max_tokens=4, temperature=0.5, top_k=3, seed=1, stop=["x"])
    assert pickle.loads(pickle.dumps(params)) == params


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        (dict(stop_token_ids=[100]), "stop_token_ids"),
        (dict(max_tokens=10), "max_tokens"),
        (dict(max_tokens=1, prompt_len=64), "prompt length 64"),
    ],
)
def test_validate_for_model_rejects(kwargs, needle):
    prompt_len = kwargs.pop("prompt_len", 60)
    params = SamplingParams(**kwargs)
    with pytest.raises(InvalidRequestError) as excinfo:
        params.validate_for_model(vocab_size=100, max_model_len=64, prompt_len=prompt_len)
    assert needle in str(excinfo.value)


def test_validate_for_model_reports_max_allowed():
    with pytest.raises(InvalidRequestError, match="maximum allowed max_tokens is 4"):
        SamplingParams(max_tokens=10).validate_for_model(100, 64, 60)
    SamplingParams(max_tokens=4, stop_token_ids=[99]).validate_for_model(100, 64, 60)


@pytest.mark.parametrize(
    "ids",
    [
        [1, 2, 3],
        (1, 2, 3),
        np.array([1, 2, 3], dtype=np.int64),
        np.array([1, 2, 3], dtype=np.uint16),
        torch.tensor([1, 2, 3]),
    ],
)
def test_prompt_ids_accepted(ids):
    out = validate_prompt_token_ids(ids, vocab_size=10, max_model_len=8)
    assert out.dtype == np.int32 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, [1, 2, 3])


def test_prompt_ids_non_contiguous_view_becomes_contiguous():
    out = validate_prompt_token_ids(np.arange(10)[::2], vocab_size=10, max_model_len=8)
    assert out.flags.c_contiguous
    np.testing.assert_array_equal(out, [0, 2, 4, 6, 8])


@pytest.mark.parametrize(
    ("ids", "needle"),
    [
        ([], "empty"),
        (np.array([], dtype=np.int32), "empty"),
        ([1.0, 2.0], "dtype float64"),
        (np.array([1.5]), "dtype float64"),
        (["a", "b"], "dtype <U1"),
        ([True, False], "dtype bool"),
        ([[1, 2], [3, 4]], "1-D"),
        ([[1, 2], [3]], "nested"),
        (np.zeros((2, 2), dtype=np.int32), "1-D"),
        (torch.tensor([1.0, 2.0]), "dtype float32"),
        ([1, -1, 2], "prompt_token_ids[1] = -1"),
        ([1, 2, 3, 70000], "prompt_token_ids[3] = 70000 is out of range for vocab size 32000"),
        (list(range(8)), "length 8"),
        ("1 2 3", "str"),
        (None, "NoneType"),
    ],
)
def test_prompt_ids_rejected(ids, needle):
    vocab = 32000 if needle.startswith("prompt_token_ids[3]") else 10
    max_len = 64 if vocab == 32000 else 8
    with pytest.raises(InvalidRequestError) as excinfo:
        validate_prompt_token_ids(ids, vocab_size=vocab, max_model_len=max_len)
    message = str(excinfo.value)
    assert "prompt_token_ids" in message
    assert needle in message

"""Per-request sampling parameters and prompt validation at the API boundary."""

from __future__ import annotations

import dataclasses
import math
import numbers
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ppruntime.config import SEED_LIMIT
from ppruntime.engine.errors import InvalidRequestError
from ppruntime.stage.greedy import SAMPLING_EPS

MAX_LOGPROBS = 20
INT32_MAX = 2**31 - 1  # counts travel between ranks as int32

_PREFIX = "SamplingParams"


def _is_int(value: Any) -> bool:
    """True for Python/numpy integers, False for bools (bool is not a count)."""
    if type(value) is int:  # the common case, without the ABC's slow isinstance
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def _is_real(value: Any) -> bool:
    if type(value) is float or type(value) is int:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))


def _fail(field: str, requirement: str, value: Any) -> InvalidRequestError:
    return InvalidRequestError(f"{_PREFIX}.{field} {requirement}, got {value!r}")


def _check_probability(field: str, value: Any, low_open: bool) -> float:
    """Validate a float in [0, 1] (or (0, 1] when ``low_open``) and return it as float."""
    interval = "(0, 1]" if low_open else "[0, 1]"
    if not _is_real(value):
        raise _fail(field, f"must be a float in {interval}", value)
    number = float(value)
    in_range = (0.0 < number <= 1.0) if low_open else (0.0 <= number <= 1.0)
    if not in_range:  # also rejects NaN
        raise _fail(field, f"must be in {interval}", value)
    return number


def check_unicode(what: str, text: str) -> None:
    """Reject text that is not valid Unicode (a lone surrogate, e.g. from a file or an
    argv that was not UTF-8): no tokenizer or output can encode it."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        bad = text[error.start]
        raise InvalidRequestError(
            f"{what} is not valid Unicode: lone surrogate {bad!r} at index {error.start} "
            "(was it read from bytes that are not UTF-8?)"
        ) from None


def _normalise_stop(stop: Any) -> tuple[str, ...]:
    strings = (stop,) if isinstance(stop, str) else stop
    if isinstance(strings, (bytes, bytearray)) or not isinstance(strings, Sequence):
        raise _fail("stop", "must be a str or a sequence of str", stop)
    for text in strings:
        if not isinstance(text, str):
            raise _fail("stop", "must contain only str", stop)
        if not text:
            raise _fail("stop", "must not contain empty strings", stop)
        check_unicode(f"{_PREFIX}.stop", text)
    return tuple(strings)


def _normalise_stop_token_ids(ids: Any) -> tuple[int, ...]:
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (Sequence, np.ndarray)):
        raise _fail("stop_token_ids", "must be a sequence of int", ids)
    for token in ids:
        if not _is_int(token):
            raise _fail("stop_token_ids", "must contain only int", ids)
        if token < 0:
            raise _fail("stop_token_ids", "must contain only non-negative ids", ids)
    return tuple(int(token) for token in ids)


@dataclass
class SamplingParams:
    """How to generate tokens for one request (vLLM-like defaults).

    ``temperature == 0`` means greedy decoding, and so does any temperature below
    ``SAMPLING_EPS`` (1e-5), which float32 logits cannot be divided by without
    overflowing. ``top_k`` of 0 or -1 disables top-k. ``seed`` is in ``[0, 2**63)``.
    ``logprobs`` asks for the top-n log-probs of each generated token (plus the chosen
    token's); ``prompt_logits`` / ``generation_logits`` ask for raw logits.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    stop_token_ids: Sequence[int] = ()
    stop: str | Sequence[str] = ()
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logits: bool = False
    generation_logits: bool = False

    def __post_init__(self) -> None:
        if not _is_int(self.max_tokens):
            raise _fail("max_tokens", "must be an int", self.max_tokens)
        if self.max_tokens <= 0:
            raise _fail("max_tokens", "must be >= 1", self.max_tokens)
        self.max_tokens = int(self.max_tokens)  # validate_for_model bounds it by the model

        if not _is_real(self.temperature):
            raise _fail("temperature", "must be a float", self.temperature)
        if not math.isfinite(self.temperature):
            raise _fail("temperature", "must be finite", self.temperature)
        if self.temperature < 0:
            raise _fail("temperature", "must be >= 0", self.temperature)
        self.temperature = float(self.temperature)

        if not _is_int(self.top_k):
            raise _fail("top_k", "must be an int", self.top_k)
        if self.top_k < -1:
            raise _fail("top_k", "must be -1, 0 (disabled) or positive", self.top_k)
        self.top_k = min(int(self.top_k), INT32_MAX)  # k >= vocab size keeps every token

        self.top_p = _check_probability("top_p", self.top_p, low_open=True)
        self.min_p = _check_probability("min_p", self.min_p, low_open=False)

        if self.seed is not None:
            if not _is_int(self.seed):
                raise _fail("seed", "must be an int or None", self.seed)
            if not 0 <= self.seed < SEED_LIMIT:
                raise _fail("seed", "must be in [0, 2**63)", self.seed)
            self.seed = int(self.seed)

        self.stop_token_ids = _normalise_stop_token_ids(self.stop_token_ids)
        self.stop = _normalise_stop(self.stop)

        for flag in ("ignore_eos", "prompt_logits", "generation_logits"):
            value = getattr(self, flag)
            if not isinstance(value, (bool, np.bool_)):
                raise _fail(flag, "must be a bool", value)
            setattr(self, flag, bool(value))

        if self.logprobs is not None:
            if not _is_int(self.logprobs):
                raise _fail("logprobs", "must be an int or None", self.logprobs)
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise _fail("logprobs", f"must be in [0, {MAX_LOGPROBS}]", self.logprobs)
            self.logprobs = int(self.logprobs)

    @classmethod
    def trusted(cls, **fields: Any) -> SamplingParams:
        """Rebuild parameters that rank 0 validated and normalised (no checks)."""
        params = object.__new__(cls)
        params.__dict__.update(_DEFAULTS)
        params.__dict__.update(fields)
        return params

    @property
    def is_greedy(self) -> bool:
        return self.temperature < SAMPLING_EPS

    @property
    def uses_top_k(self) -> bool:
        return self.top_k > 0

    def validate_for_model(self, vocab_size: int, max_model_len: int, prompt_len: int) -> None:
        """Check the fields that depend on the model and the prompt length."""
        for token in self.stop_token_ids:
            if token >= vocab_size:
                raise InvalidRequestError(
                    f"{_PREFIX}.stop_token_ids contains {token}, which is out of range "
                    f"for vocab size {vocab_size}"
                )
        if prompt_len >= max_model_len:
            raise InvalidRequestError(
                f"prompt length {prompt_len} leaves no room for a new token "
                f"(max_model_len = {max_model_len})"
            )
        if prompt_len + self.max_tokens > max_model_len:
            raise InvalidRequestError(
                f"{_PREFIX}.max_tokens = {self.max_tokens} with prompt length {prompt_len} "
                f"exceeds max_model_len = {max_model_len}; the maximum allowed max_tokens "
                f"is {max_model_len - prompt_len}"
            )


def _as_numpy(ids: Any) -> np.ndarray:
    """Convert the prompt to numpy once, without a Python loop for array inputs."""
    if isinstance(ids, np.ndarray):
        return ids
    torch = sys.modules.get("torch")  # a tensor implies torch is imported: never import it here
    if torch is not None and isinstance(ids, torch.Tensor):
        return ids.detach().cpu().numpy()
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
        raise InvalidRequestError(
            "prompt_token_ids must be a list, tuple, numpy array or torch tensor of int, "
            f"got {type(ids).__name__}"
        )
    try:
        # object dtype for ragged / nested input is detected below via ndim/dtype checks
        return np.asarray(ids)
    except ValueError:  # ragged nested sequences
        raise InvalidRequestError(
            "prompt_token_ids must be a flat sequence of int, got a nested sequence"
        ) from None


_INT32, _UINT32 = np.dtype(np.int32), np.dtype(np.uint32)


def validate_prompt_token_ids(ids: Any, vocab_size: int, max_model_len: int) -> np.ndarray:
    """Convert prompt token ids once to a contiguous int32 array and validate them.

    Accepts a 1-D numpy array of integer dtype, a list/tuple of int, or a 1-D integer
    torch tensor. Raises ``InvalidRequestError`` naming the problem otherwise.
    """
    array = _as_numpy(ids)
    if array.ndim != 1:
        raise InvalidRequestError(
            f"prompt_token_ids must be 1-D, got an array of shape {tuple(array.shape)}"
        )
    length = array.shape[0]
    if length == 0:
        raise InvalidRequestError("prompt_token_ids must not be empty")
    if array.dtype.kind not in "iu":  # bool is kind "b"
        raise InvalidRequestError(
            f"prompt_token_ids must contain only int, got dtype {array.dtype}"
        )
    if length >= max_model_len:
        raise InvalidRequestError(
            f"prompt_token_ids has length {length}, which leaves no room for a new token "
            f"(max_model_len = {max_model_len})"
        )
    if array.dtype == _INT32:
        # one pass, no temporaries: negative ids are huge as unsigned
        in_range = int(np.maximum.reduce(array.view(_UINT32))) < vocab_size
    else:
        in_range = int(array.min()) >= 0 and int(array.max()) < vocab_size
    if not in_range:
        index = int(np.argmax((array < 0) | (array >= vocab_size)))
        raise InvalidRequestError(
            f"prompt_token_ids[{index}] = {int(array[index])} is out of range "
            f"for vocab size {vocab_size}"
        )
    if array.dtype == _INT32:
        return array.copy()  # the caller may reuse its buffer for the next prompt
    return np.ascontiguousarray(array, dtype=np.int32)


_DEFAULTS = {field.name: field.default for field in dataclasses.fields(SamplingParams)}

"""A request's checks before it reaches the engine: prompt to token ids, parameters
against the model. Used by `LLM` and by the HTTP process (which has the tokenizer
and the model's limits, not the engine)."""

from __future__ import annotations

import numpy as np

from ppruntime.engine.errors import InvalidRequestError
from ppruntime.engine.sampling_params import (
    SamplingParams,
    check_unicode,
    validate_prompt_token_ids,
)
from ppruntime.model.tokenizer import Tokenizer, require_tokenizer


def encode_prompt(
    prompt, tokenizer: Tokenizer | None, model: str, vocab_size: int, max_model_len: int
) -> np.ndarray:
    """Text or token ids -> validated contiguous int32 token ids (converted once)."""
    if isinstance(prompt, str):
        if not prompt:
            raise InvalidRequestError("prompt must not be empty")
        check_unicode("prompt", prompt)
        ids = require_tokenizer(tokenizer, model).encode(prompt)
    else:
        ids = prompt
    return validate_prompt_token_ids(ids, vocab_size, max_model_len)


def validate_request(
    prompt_ids: np.ndarray,
    params: SamplingParams,
    vocab_size: int,
    max_model_len: int,
    has_tokenizer: bool,
) -> None:
    if not isinstance(params, SamplingParams):
        raise InvalidRequestError(
            f"sampling_params must be a SamplingParams, got {type(params).__name__}"
        )
    params.__post_init__()  # again: fields may have been changed after construction
    params.validate_for_model(vocab_size, max_model_len, prompt_ids.shape[0])
    if params.stop and not has_tokenizer:
        raise InvalidRequestError(
            f"SamplingParams.stop={params.stop!r} needs a tokenizer; this model has none"
        )

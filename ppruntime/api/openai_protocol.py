"""The OpenAI completions and chat wire format: requests in, response objects out.

Pure functions over JSON values (no HTTP, no engine): a request body becomes the
engine's prompts and one `SamplingParams` per choice, or raises `ProtocolError`
naming the field and the value (the server answers 400 with that message). Unknown
fields are refused; OpenAI fields that ppruntime does not implement are accepted
only at their neutral value.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ppruntime.config import SEED_LIMIT
from ppruntime.engine.errors import InvalidRequestError
from ppruntime.engine.sampling_params import MAX_LOGPROBS, SamplingParams

MAX_CHOICES = 16


class ProtocolError(ValueError):
    """A request that does not follow the protocol; the message names field and value."""


# fields accepted only at a neutral value: name -> the values that mean "off"
_NEUTRAL = {
    "frequency_penalty": (0, 0.0, None),
    "presence_penalty": (0, 0.0, None),
    "logit_bias": (None, {}),
    "best_of": (None, 1),
    "echo": (False, None),
    "suffix": (None, ""),
    "parallel_tool_calls": (None, False, True),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "response_format": (None, {"type": "text"}),
}
_COMMON = {
    "model",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "n",
    "stream",
    "stream_options",
    "stop",
    "seed",
    "user",
    "ignore_eos",
    "stop_token_ids",
}
COMPLETION_FIELDS = _COMMON | {"prompt", "logprobs"}
CHAT_FIELDS = _COMMON | {"messages", "logprobs", "top_logprobs", "max_completion_tokens"}


@dataclass
class ParsedRequest:
    """What the engine needs for one HTTP request."""

    prompt: str | list[int] | None  # completions (one prompt per request)
    messages: list[dict[str, str]] | None  # chat: to be rendered by the chat template
    params: list[SamplingParams]  # one per choice (n)
    stream: bool
    include_usage: bool
    num_logprobs: int | None  # completions: logprobs=N; chat: top_logprobs (None = off)
    model: str | None
    extra: dict[str, Any] = field(default_factory=dict)


def _fail(name: str, requirement: str, value: Any) -> ProtocolError:
    return ProtocolError(f"'{name}' {requirement}, got {value!r}")


def _is_int(value: Any) -> bool:
    if type(value) is int:  # what JSON gives, without the ABC's slow isinstance
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    if type(value) is float or type(value) is int:
        return True
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_fields(body: Any, allowed: set[str]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise ProtocolError(f"the request body must be a JSON object, got {type(body).__name__}")
    for name, value in body.items():
        if name in _NEUTRAL:
            if value not in _NEUTRAL[name]:
                raise _fail(name, "is not supported by ppruntime (only its default)", value)
        elif name not in allowed:
            raise ProtocolError(f"unknown field {name!r}")
    return body


def _optional(body: dict, name: str, check, requirement: str, default: Any) -> Any:
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise _fail(name, requirement, value)
    return value


def _stop(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise _fail("stop", "must be a non-empty string or a list of them", body.get("stop"))
    if len(stop) > 4:
        raise _fail("stop", "may hold at most 4 sequences", stop)
    return tuple(stop)


def _sampling(body: dict, num_logprobs: int | None) -> list[SamplingParams]:
    n = _optional(body, "n", _is_int, "must be an integer", 1)
    if not 1 <= n <= MAX_CHOICES:
        raise _fail("n", f"must be in [1, {MAX_CHOICES}]", n)
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = 16 if max_tokens is None else max_tokens
    if not _is_int(max_tokens) or max_tokens < 1:
        raise _fail("max_tokens", "must be a positive integer", max_tokens)
    seed = _optional(body, "seed", _is_int, "must be an integer", None)
    if seed is not None and not 0 <= seed < SEED_LIMIT:  # the choices' seeds wrap in range
        raise _fail("seed", "must be in [0, 2**63)", seed)
    stream = _optional(body, "stream", lambda v: isinstance(v, bool), "must be a boolean", False)
    del stream  # checked here, read by the caller
    kwargs = {
        "max_tokens": max_tokens,
        "temperature": _optional(body, "temperature", _is_number, "must be a number", 1.0),
        "top_p": _optional(body, "top_p", _is_number, "must be a number", 1.0),
        "top_k": _optional(body, "top_k", _is_int, "must be an integer", 0),
        "min_p": _optional(body, "min_p", _is_number, "must be a number", 0.0),
        "stop": _stop(body),
        "ignore_eos": _optional(
            body, "ignore_eos", lambda v: isinstance(v, bool), "must be a boolean", False
        ),
        "stop_token_ids": _optional(
            body,
            "stop_token_ids",
            lambda v: isinstance(v, list) and all(_is_int(t) for t in v),
            "must be a list of integers",
            [],
        ),
        "logprobs": num_logprobs,
    }
    if kwargs["temperature"] > 2.0:
        raise _fail("temperature", "must be in [0, 2]", kwargs["temperature"])
    params = []
    for index in range(n):
        # n choices of one seeded request differ from each other, reproducibly
        choice_seed = None if seed is None else (seed + index) % SEED_LIMIT
        try:
            params.append(SamplingParams(seed=choice_seed, **kwargs))
        except InvalidRequestError as error:
            raise ProtocolError(str(error).replace("SamplingParams.", "")) from None
    return params


def _stream_options(body: dict) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise _fail("stream_options", 'must be {"include_usage": bool}', options)
    if not body.get("stream"):
        raise ProtocolError("'stream_options' is only allowed with 'stream': true")
    return bool(options.get("include_usage", False))


def parse_completion_request(body: Any) -> ParsedRequest:
    body = _check_fields(body, COMPLETION_FIELDS)
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]  # a batch of one
    if isinstance(prompt, str):
        if not prompt:
            raise _fail("prompt", "must not be empty", prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        prompt = [int(t) for t in prompt]
    else:
        raise _fail(
            "prompt", "must be a non-empty string or list of token ids (one prompt)", prompt
        )
    logprobs = body.get("logprobs")
    if logprobs is not None and (not _is_int(logprobs) or not 0 <= logprobs <= MAX_LOGPROBS):
        raise _fail("logprobs", f"must be an integer in [0, {MAX_LOGPROBS}]", logprobs)
    return ParsedRequest(
        prompt=prompt,
        messages=None,
        params=_sampling(body, logprobs),
        stream=bool(body.get("stream", False)),
        include_usage=_stream_options(body),
        num_logprobs=logprobs,
        model=body.get("model"),
    )


def _message_text(index: int, message: Any) -> dict[str, str]:
    where = f"messages[{index}]"
    if not isinstance(message, dict) or "role" not in message:
        raise _fail(where, "must be an object with 'role' and 'content'", message)
    role, content = message.get("role"), message.get("content")
    if role not in ("system", "user", "assistant", "developer"):
        raise _fail(f"{where}.role", "must be system, developer, user or assistant", role)
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise _fail(f"{where}.content", "may hold only text parts", part)
            parts.append(str(part.get("text", "")))
        content = "".join(parts)
    if not isinstance(content, str):
        raise _fail(f"{where}.content", "must be a string or a list of text parts", content)
    return {"role": role, "content": content}


def parse_chat_request(body: Any) -> ParsedRequest:
    body = _check_fields(body, CHAT_FIELDS)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _fail("messages", "must be a non-empty list", messages)
    parsed = [_message_text(index, message) for index, message in enumerate(messages)]
    wants = _optional(body, "logprobs", lambda v: isinstance(v, bool), "must be a boolean", False)
    top = _optional(body, "top_logprobs", _is_int, "must be an integer", None)
    if top is not None and not 0 <= top <= MAX_LOGPROBS:
        raise _fail("top_logprobs", f"must be in [0, {MAX_LOGPROBS}]", top)
    if top is not None and not wants:
        raise ProtocolError("'top_logprobs' needs 'logprobs': true")
    num_logprobs = (top or 0) if wants else None
    return ParsedRequest(
        prompt=None,
        messages=parsed,
        params=_sampling(body, num_logprobs),
        stream=bool(body.get("stream", False)),
        include_usage=_stream_options(body),
        num_logprobs=num_logprobs,
        model=body.get("model"),
    )


# -- responses ----------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_logprobs(
    token_ids: Sequence[int],
    steps: Sequence[dict[int, float]],
    top_n: int,
    token_text,
    text_offset: int = 0,
) -> dict[str, list]:
    """The completions `logprobs` object for generated tokens."""
    tokens, chosen, tops, offsets = [], [], [], []
    offset = text_offset
    for token, step in zip(token_ids, steps):
        text = token_text(token)
        tokens.append(text)
        chosen.append(step.get(token))
        best = sorted(step.items(), key=lambda item: -item[1])[:top_n]
        tops.append({token_text(t): value for t, value in best} if top_n else None)
        offsets.append(offset)
        offset += len(text)
    return {
        "tokens": tokens,
        "token_logprobs": chosen,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def chat_logprobs(
    token_ids: Sequence[int], steps: Sequence[dict[int, float]], top_n: int, token_text
) -> dict[str, list]:
    """The chat `logprobs` object: one entry per generated token."""
    content = []
    for token, step in zip(token_ids, steps):
        text = token_text(token)
        best = sorted(step.items(), key=lambda item: -item[1])[:top_n]
        content.append(
            {
                "token": text,
                "logprob": step.get(token),
                "bytes": list(text.encode("utf-8", "surrogatepass")),
                "top_logprobs": [
                    {
                        "token": token_text(t),
                        "logprob": value,
                        "bytes": list(token_text(t).encode("utf-8", "surrogatepass")),
                    }
                    for t, value in best
                ],
            }
        )
    return {"content": content}


class StreamChunks:
    """Server-sent events of one streamed response, built from pre-encoded pieces.

    The fields every chunk repeats (id, object, created, model) are JSON-encoded once;
    an entry without logprobs is a format string around its JSON-encoded text, so a
    token costs one small `json.dumps` of a string instead of one of a whole chunk.
    """

    def __init__(
        self, response_id: str, created: int, model: str, chat: bool, include_usage: bool
    ) -> None:
        kind = "chat.completion.chunk" if chat else "text_completion"
        head = json.dumps({"id": response_id, "object": kind, "created": created, "model": model})
        self._head = f'data: {head[:-1]}, "choices": ['
        self._tail = "]" + (', "usage": null' if include_usage else "") + "}\n\n"
        self._usage_head = f'data: {head[:-1]}, "choices": [], "usage": '
        self.chat = chat

    def entry(
        self,
        index: int,
        text: str,
        finish_reason: str | None,
        logprobs: dict | None = None,
        error: str | None = None,
        role: str | None = None,
    ) -> str:
        """One choice's JSON: index, logprobs, finish_reason, then delta (chat) or text."""
        if logprobs is not None or error is not None or role is not None:
            entry: dict[str, Any] = {
                "index": index,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
            }
            if self.chat:
                delta = {"role": role} if role is not None else {}
                if text or role is not None:
                    delta["content"] = text
                entry["delta"] = delta
            else:
                entry["text"] = text
            if error is not None:
                entry["error"] = error
            return json.dumps(entry)
        finish = "null" if finish_reason is None else json.dumps(finish_reason)
        if not self.chat:
            return f'{{"index": {index}, "logprobs": null, "finish_reason": {finish}, ' + (
                f'"text": {json.dumps(text)}}}'
            )
        content = f'{{"content": {json.dumps(text)}}}' if text else "{}"
        return (
            f'{{"index": {index}, "logprobs": null, "finish_reason": {finish}, "delta": {content}}}'
        )

    def chunk(self, entries: list[str]) -> str:
        return self._head + ", ".join(entries) + self._tail

    def usage_chunk(self, usage_value: dict[str, int]) -> str:
        return self._usage_head + json.dumps(usage_value) + "}\n\n"

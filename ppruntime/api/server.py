"""The OpenAI-compatible HTTP front end (FastAPI): runs on rank 0's event loop thread.

Handlers parse and validate a request (400 naming the field), reserve room in the
bounded waiting queue (503 with Retry-After when full), hand the request to the
`EngineDriver` and await its deltas. A client that disconnects aborts its requests
(their KV blocks are freed on every rank). Bodies are JSON only, read with a size
limit before parsing.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from ppruntime.api.chat_template import ChatTemplate, ChatTemplateError
from ppruntime.api.openai_protocol import (
    ParsedRequest,
    ProtocolError,
    chat_logprobs,
    completion_logprobs,
    parse_chat_request,
    parse_completion_request,
    usage,
)
from ppruntime.api.server_metrics import ServerMetrics
from ppruntime.api.serving import EngineDriver
from ppruntime.engine.errors import InvalidRequestError
from ppruntime.engine.outputs import RequestOutput

DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = "1"


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


class _Choice:
    """One engine request (a choice) and the deltas that arrived for it."""

    def __init__(self, index: int, request_id: str) -> None:
        self.index = index
        self.request_id = request_id
        self.token_ids: list[int] = []
        self.text = ""
        self.logprobs: list[dict[int, float]] = []
        self.finish_reason: str | None = None
        self.error: str | None = None

    def add(self, delta: RequestOutput) -> None:
        self.token_ids.extend(delta.token_ids)
        self.text += delta.text
        if delta.logprobs:
            self.logprobs.extend(delta.logprobs)
        if delta.finished:
            self.finish_reason = delta.finish_reason
            if delta.finish_reason == "error":
                self.error = delta.error or "the request failed"


def build_app(
    driver: EngineDriver,
    model_name: str,
    chat_template: ChatTemplate | None,
    max_body_bytes: int,
    metrics: ServerMetrics,
):
    app = FastAPI(title="ppruntime", docs_url=None, redoc_url=None)
    llm = driver.llm

    def error_response(error: _HTTPError) -> JSONResponse:
        headers = {"Retry-After": RETRY_AFTER_S} if error.status == 503 else None
        body = {"error": {"message": error.message, "type": error.kind, "code": error.status}}
        return JSONResponse(body, status_code=error.status, headers=headers)

    async def read_json(request: Request) -> object:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _HTTPError(413, f"request body of {declared} bytes exceeds {max_body_bytes}")
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                raise _HTTPError(413, f"request body exceeds {max_body_bytes} bytes")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise _HTTPError(400, f"the request body is not JSON: {error}") from None

    def encode(parsed: ParsedRequest):
        if parsed.model is not None and parsed.model != model_name:
            raise _HTTPError(
                404,
                f"model {parsed.model!r} is not served here; try {model_name!r}",
                "not_found_error",
            )
        prompt = parsed.prompt
        if parsed.messages is not None:
            if chat_template is None:
                raise _HTTPError(
                    400,
                    f"model {model_name!r} has no chat template (tokenizer_config.json "
                    "'chat_template'); use /v1/completions",
                )
            try:
                prompt = chat_template.render(parsed.messages)
            except ChatTemplateError as error:
                raise _HTTPError(400, str(error)) from None
        try:
            prompt_ids = llm.encode_prompt(prompt)
            for params in parsed.params:
                llm.validate_request(prompt_ids, params)
        except (InvalidRequestError, ValueError) as error:
            raise _HTTPError(400, str(error).replace("SamplingParams.", "")) from None
        return prompt_ids

    def start(parsed: ParsedRequest, prompt_ids, prefix: str):
        """Submit one engine request per choice; deltas land on `events`."""
        if not driver.reserve(len(parsed.params)):
            if not driver.accepting:
                raise _HTTPError(503, "the server is shutting down", "unavailable")
            raise _HTTPError(503, "too many requests waiting; retry later", "overloaded")
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        choices = []
        for index, params in enumerate(parsed.params):
            request_id = driver.new_request_id(prefix)
            choices.append(_Choice(index, request_id))
            driver.submit(request_id, prompt_ids, params, loop, events.put_nowait)
        return choices, events

    def token_text(token: int) -> str:
        return llm.tokenizer.decode([token]) if llm.tokenizer is not None else str(token)

    async def next_deltas(request: Request, events: asyncio.Queue) -> list[RequestOutput]:
        while True:
            try:
                return await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ConnectionAbortedError from None

    async def handle(request: Request, chat: bool):
        metrics.requests_total.labels("chat" if chat else "completions").inc()
        try:
            parsed = (parse_chat_request if chat else parse_completion_request)(
                await read_json(request)
            )
        except ProtocolError as error:
            return error_response(_HTTPError(400, str(error)))
        except _HTTPError as error:
            return error_response(error)
        try:
            prompt_ids = encode(parsed)
            choices, events = start(parsed, prompt_ids, "chatcmpl" if chat else "cmpl")
        except _HTTPError as error:
            return error_response(error)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if parsed.stream:
            stream = _stream(
                request, parsed, choices, events, response_id, created, chat, len(prompt_ids)
            )
            return StreamingResponse(stream, media_type="text/event-stream")
        by_id = {choice.request_id: choice for choice in choices}
        try:
            while any(c.finish_reason is None for c in choices):
                for delta in await next_deltas(request, events):
                    by_id[delta.request_id].add(delta)
        except (ConnectionAbortedError, asyncio.CancelledError):
            for choice in choices:
                if choice.finish_reason is None:
                    driver.abort(choice.request_id)
            raise
        failed = [c.error for c in choices if c.error]
        if failed:
            return error_response(_HTTPError(500, failed[0], "engine_error"))
        return _final_body(parsed, choices, response_id, created, chat, len(prompt_ids))

    def _final_body(parsed, choices, response_id, created, chat, prompt_tokens) -> dict:
        top_n = parsed.num_logprobs or 0
        body_choices = []
        for choice in choices:
            logprobs = None
            if parsed.num_logprobs is not None:
                maker = chat_logprobs if chat else completion_logprobs
                logprobs = maker(choice.token_ids, choice.logprobs, top_n, token_text)
            entry = {
                "index": choice.index,
                "logprobs": logprobs,
                "finish_reason": choice.finish_reason,
            }
            if chat:
                entry["message"] = {"role": "assistant", "content": choice.text}
            else:
                entry["text"] = choice.text
            body_choices.append(entry)
        completion_tokens = sum(len(c.token_ids) for c in choices)
        return {
            "id": response_id,
            "object": "chat.completion" if chat else "text_completion",
            "created": created,
            "model": model_name,
            "choices": body_choices,
            "usage": usage(prompt_tokens, completion_tokens),
        }

    def _stream_entry(choice: _Choice, deltas, parsed, chat: bool, top_n: int) -> dict:
        text = "".join(delta.text for delta in deltas)
        token_ids = [token for delta in deltas for token in delta.token_ids]
        steps = [step for delta in deltas for step in (delta.logprobs or [])]
        logprobs = None
        if parsed.num_logprobs is not None and steps:
            maker = chat_logprobs if chat else completion_logprobs
            logprobs = maker(token_ids, steps, top_n, token_text)
        entry = {"index": choice.index, "logprobs": logprobs, "finish_reason": choice.finish_reason}
        if chat:
            entry["delta"] = {"content": text} if text else {}
        else:
            entry["text"] = text
        if choice.error:
            entry["error"] = choice.error
        return entry

    async def _stream(request, parsed, choices, events, response_id, created, chat, prompt_tokens):
        by_id = {choice.request_id: choice for choice in choices}
        kind = "chat.completion.chunk" if chat else "text_completion"
        top_n = parsed.num_logprobs or 0

        def chunk(entries: list[dict], usage_value=None) -> str:
            body = {
                "id": response_id,
                "object": kind,
                "created": created,
                "model": model_name,
                "choices": entries,
            }
            if parsed.include_usage:
                body["usage"] = usage_value
            return f"data: {json.dumps(body)}\n\n"

        done = False
        try:
            if chat:
                yield chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for c in choices
                    ]
                )
            while any(c.finish_reason is None for c in choices):
                # one entry per choice per chunk, however many deltas arrived for it
                arrived: dict[str, list[RequestOutput]] = {}
                for delta in await next_deltas(request, events):
                    by_id[delta.request_id].add(delta)
                    arrived.setdefault(delta.request_id, []).append(delta)
                entries = [
                    _stream_entry(by_id[request_id], deltas, parsed, chat, top_n)
                    for request_id, deltas in arrived.items()
                ]
                if entries:
                    yield chunk(entries)
            done = True
            if parsed.include_usage:
                completion_tokens = sum(len(c.token_ids) for c in choices)
                yield chunk([], usage(prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (or the server stops): free the blocks
                for choice in choices:
                    if choice.finish_reason is None:
                        driver.abort(choice.request_id)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await handle(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await handle(request, chat=True)

    @app.get("/v1/models")
    async def models():
        entry = {
            "id": model_name,
            "object": "model",
            "created": 0,
            "owned_by": "ppruntime",
            "max_model_len": llm.max_model_len,
        }
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health():
        if not driver.accepting:
            return error_response(_HTTPError(503, "the server is shutting down", "unavailable"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        return PlainTextResponse(metrics.render(driver.stats), media_type=metrics.content_type)

    return app

"""The OpenAI-compatible HTTP front end (FastAPI): runs on rank 0's event loop thread.

Handlers parse and validate a request (400 naming the field), reserve room in the
bounded waiting queue (503 with Retry-After when full), hand the request to the
`EngineDriver` and await its deltas. A client that disconnects aborts its requests
(their KV blocks are freed on every rank). Bodies are JSON only, read with a size
limit before parsing.

Deltas arrive in batches (one `DeltaOutbox` drain per engine step at most, see
serving.py) and are routed to each request's `_DeltaStream`; a stream takes all it
has when its handler runs again, so a client (or a loop) that is behind gets one
chunk carrying several tokens instead of falling further behind one chunk a token.
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
    StreamChunks,
    chat_logprobs,
    completion_logprobs,
    parse_chat_request,
    parse_completion_request,
    usage,
)
from ppruntime.api.server_metrics import ServerMetrics
from ppruntime.api.serving import DeltaOutbox, EngineDriver
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


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


class _DeltaStream:
    """The deltas of one HTTP request (all its choices) not yet taken by its handler."""

    def __init__(self, loop: asyncio.AbstractEventLoop, router: _Router) -> None:
        self._loop = loop
        self.router = router
        self._pending: list[RequestOutput] = []
        self._waiter: asyncio.Future | None = None

    def push(self, delta: RequestOutput) -> None:
        self._pending.append(delta)
        if self._waiter is not None:
            _wake(self._waiter)

    async def take(self, request: Request) -> list[RequestOutput]:
        """Everything that arrived since the last take (waits for at least one delta);
        raises ConnectionAbortedError when the client has gone while waiting."""
        while not self._pending:
            self._waiter = self._loop.create_future()
            timer = self._loop.call_later(DISCONNECT_POLL_S, _wake, self._waiter)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._pending and await request.is_disconnected():
                raise ConnectionAbortedError
        batch, self._pending = self._pending, []
        return batch


class _Router:
    """The event loop's end of the engine: one outbox, deltas routed by request id."""

    def __init__(self, loop: asyncio.AbstractEventLoop, http_share: float) -> None:
        self.loop = loop
        self.outbox = DeltaOutbox(loop, self._deliver, http_share)
        self._streams: dict[str, _DeltaStream] = {}

    def open(self, request_ids: list[str]) -> _DeltaStream:
        stream = _DeltaStream(self.loop, self)
        for request_id in request_ids:
            self._streams[request_id] = stream
        return stream

    def close(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self._streams.pop(request_id, None)

    def _deliver(self, deltas: list[RequestOutput]) -> None:
        began = time.perf_counter()
        streams = self._streams
        for delta in deltas:
            stream = streams.get(delta.request_id)
            if stream is None:  # its handler has gone (client disconnected)
                continue
            stream.push(delta)
            if delta.finished:
                del streams[delta.request_id]
        # the handlers woken above run before this: their chunks are part of the burst
        self.loop.call_soon(self._burst_done, began)

    def _burst_done(self, began: float) -> None:
        self.outbox.burst_ended(time.perf_counter() - began)


def build_app(
    driver: EngineDriver,
    model_name: str,
    chat_template: ChatTemplate | None,
    max_body_bytes: int,
    metrics: ServerMetrics,
    http_share: float = 0.2,
):
    app = FastAPI(title="ppruntime", docs_url=None, redoc_url=None)
    llm = driver.llm
    routers: dict[int, _Router] = {}  # by id(loop): in practice the one server loop

    def router() -> _Router:
        loop = asyncio.get_running_loop()
        found = routers.get(id(loop))
        if found is None or found.loop is not loop:
            found = routers[id(loop)] = _Router(loop, http_share)
        return found

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
        """Submit one engine request per choice; their deltas land on the stream."""
        if not driver.reserve(len(parsed.params)):
            if not driver.accepting:
                raise _HTTPError(503, "the server is shutting down", "unavailable")
            raise _HTTPError(503, "too many requests waiting; retry later", "overloaded")
        choices = [
            _Choice(index, driver.new_request_id(prefix)) for index in range(len(parsed.params))
        ]
        route = router()
        stream = route.open([choice.request_id for choice in choices])
        for choice, params in zip(choices, parsed.params):
            driver.submit(choice.request_id, prompt_ids, params, route.outbox)
        return choices, stream

    def abandon(choices: list[_Choice], stream: _DeltaStream) -> None:
        """The handler ends before its choices did: abort them, stop routing to it."""
        unfinished = [choice.request_id for choice in choices if choice.finish_reason is None]
        for request_id in unfinished:
            driver.abort(request_id)
        stream.router.close(unfinished)

    def token_text(token: int) -> str:
        return llm.tokenizer.decode([token]) if llm.tokenizer is not None else str(token)

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
            choices, stream = start(parsed, prompt_ids, "chatcmpl" if chat else "cmpl")
        except _HTTPError as error:
            return error_response(error)
        response_id = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        if parsed.stream:
            events = _stream(
                request, parsed, choices, stream, response_id, created, chat, len(prompt_ids)
            )
            return StreamingResponse(events, media_type="text/event-stream")
        by_id = {choice.request_id: choice for choice in choices}
        try:
            while any(c.finish_reason is None for c in choices):
                for delta in await stream.take(request):
                    by_id[delta.request_id].add(delta)
        except (ConnectionAbortedError, asyncio.CancelledError):
            abandon(choices, stream)
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

    def _stream_entry(choice: _Choice, deltas, parsed, chunks: StreamChunks, top_n: int) -> str:
        text = deltas[0].text if len(deltas) == 1 else "".join(delta.text for delta in deltas)
        logprobs = None
        if parsed.num_logprobs is not None:
            steps = [step for delta in deltas for step in (delta.logprobs or [])]
            if steps:
                token_ids = [token for delta in deltas for token in delta.token_ids]
                maker = chat_logprobs if chunks.chat else completion_logprobs
                logprobs = maker(token_ids, steps, top_n, token_text)
        return chunks.entry(choice.index, text, choice.finish_reason, logprobs, choice.error)

    async def _stream(request, parsed, choices, stream, response_id, created, chat, prompt_tokens):
        by_id = {choice.request_id: choice for choice in choices}
        top_n = parsed.num_logprobs or 0
        chunks = StreamChunks(response_id, created, model_name, chat, parsed.include_usage)
        done = False
        try:
            if chat:
                yield chunks.chunk(
                    [chunks.entry(c.index, "", None, role="assistant") for c in choices]
                )
            while any(c.finish_reason is None for c in choices):
                # one entry per choice per chunk, however many deltas arrived for it
                arrived: dict[str, list[RequestOutput]] = {}
                for delta in await stream.take(request):
                    by_id[delta.request_id].add(delta)
                    arrived.setdefault(delta.request_id, []).append(delta)
                entries = [
                    _stream_entry(by_id[request_id], deltas, parsed, chunks, top_n)
                    for request_id, deltas in arrived.items()
                ]
                if entries:
                    yield chunks.chunk(entries)
            done = True
            if parsed.include_usage:
                completion_tokens = sum(len(c.token_ids) for c in choices)
                yield chunks.usage_chunk(usage(prompt_tokens, completion_tokens))
            yield "data: [DONE]\n\n"
        finally:
            if not done:  # the client went away (or the server stops): free the blocks
                abandon(choices, stream)

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

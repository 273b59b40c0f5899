"""The OpenAI-compatible HTTP front end (FastAPI): runs in the HTTP process.

Handlers parse and validate a request (400 naming the field), tokenize it, reserve room
in the bounded waiting queue (503 with Retry-After when full), send it to the engine
process through the `EngineClient` and await its deltas. A client that disconnects
aborts its requests (their KV blocks are freed on every rank). Bodies are JSON only,
read with a size limit before parsing.

Deltas arrive in frames (one per engine step at most, see serving.py) and are routed to
each request's `_DeltaStream`; a stream takes all it has when its handler runs again, so
a client (or a loop) that is behind gets one chunk carrying several tokens instead of
falling further behind one chunk a token.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ppruntime.api.chat_template import ChatTemplate, ChatTemplateError
from ppruntime.api.event_stream import STREAM_END, EventStreamResponse
from ppruntime.api.http_link import (
    RECEIVE_BYTES,
    Delta,
    FrameReader,
    LinkError,
    delta_from_wire,
    encode_frame,
    params_to_wire,
)
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
from ppruntime.api.request_checks import encode_prompt, validate_request
from ppruntime.api.server_metrics import ServerMetrics, ServingStats
from ppruntime.engine.errors import InvalidRequestError
from ppruntime.logs import get_logger

log = get_logger("serve")

DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = "1"
STATS_WAIT_S = 5.0
CLIENT_GONE_STATUS = 499  # "client closed request": the answer to a client that has gone


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind


@dataclass
class ModelFacts:
    """What the HTTP process knows of the model and the engine (the "hello" settings)."""

    model: str  # the --model / --preset argument (the tokenizer and the chat template)
    served_name: str
    vocab_size: int
    max_model_len: int
    capacity: int  # sequences the engine runs at once
    max_waiting: int


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

    def add(self, delta: Delta) -> None:
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

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._pending: list[Delta] = []
        self._waiter: asyncio.Future | None = None
        self._next_poll = loop.time() + DISCONNECT_POLL_S

    def push(self, delta: Delta) -> None:
        self._pending.append(delta)
        if self._waiter is not None:
            _wake(self._waiter)

    async def take(self, request: Request) -> list[Delta]:
        """Everything that arrived since the last take (waits for at least one delta);
        raises ConnectionAbortedError when the client has gone: asked every
        DISCONNECT_POLL_S while waiting, and as often while deltas keep arriving (a
        non-streamed response writes nothing before it ends, so nothing else notices)."""
        while not self._pending:
            self._waiter = self._loop.create_future()
            timer = self._loop.call_later(DISCONNECT_POLL_S, _wake, self._waiter)
            try:
                await self._waiter
            finally:
                timer.cancel()
                self._waiter = None
            if not self._pending:
                await self._raise_if_gone(request)
        if self._loop.time() >= self._next_poll:
            await self._raise_if_gone(request)
        batch, self._pending = self._pending, []
        return batch

    async def _raise_if_gone(self, request: Request) -> None:
        self._next_poll = self._loop.time() + DISCONNECT_POLL_S
        if await request.is_disconnected():
            raise ConnectionAbortedError


class EngineClient:
    """The HTTP process's end of the link: requests out, deltas routed in by request id.

    It also keeps the bounded waiting queue's count (requests sent and not finished),
    so a 503 needs no round trip to the engine. Messages sent during one pass of the
    event loop go out as one frame.
    """

    def __init__(self, facts: ModelFacts, writer: asyncio.StreamWriter | None = None) -> None:
        self.facts = facts
        self.accepting = True
        self.engine_gone = False
        self._writer = writer
        self._outgoing: list[list] = []
        self._streams: dict[str, _DeltaStream] = {}
        self._live: set[str] = set()  # sent to the engine, not finished
        self._reserved = 0
        self._ids = 0
        self._stats_waiters: list[asyncio.Future] = []
        self._stats_asked_at = 0.0  # the event loop's clock
        self._last_stats = ServingStats()

    # -- handlers' side ---------------------------------------------------------------
    def reserve(self, count: int) -> bool:
        """Room for `count` more requests in the bounded waiting queue (then counted)."""
        outstanding = self._reserved + count
        waiting = max(outstanding - self.facts.capacity, 0)
        if waiting > self.facts.max_waiting or not self.accepting or self.engine_gone:
            return False
        self._reserved = outstanding
        return True

    def new_request_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}-{self._ids}"

    def submit(self, request_ids: list[str], prompt_ids, params_list) -> _DeltaStream:
        """Send one engine request per id (room reserved); their deltas land on the stream."""
        stream = _DeltaStream(asyncio.get_running_loop())
        prompt = [int(token) for token in prompt_ids]
        for request_id, params in zip(request_ids, params_list):
            self._streams[request_id] = stream
            self._live.add(request_id)
            self._send(["submit", request_id, prompt, params_to_wire(params)])
        return stream

    def abandon(self, request_ids: list[str]) -> None:
        """Their handler has ended (client gone): abort them, stop routing to it."""
        for request_id in request_ids:
            self._streams.pop(request_id, None)
            if request_id in self._live:
                self._send(["abort", request_id])

    async def stats(self) -> ServingStats:
        """The engine's latest figures (asked for now; the last ones if it does not answer)."""
        if self.engine_gone:
            return self._last_stats
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        # one ask for the scrapes of a moment; again once an ask has waited STATS_WAIT_S
        if not self._stats_waiters or loop.time() - self._stats_asked_at >= STATS_WAIT_S:
            self._stats_asked_at = loop.time()
            self._send(["stats"])
        self._stats_waiters.append(waiter)
        try:
            return await asyncio.wait_for(asyncio.shield(waiter), STATS_WAIT_S)
        except asyncio.TimeoutError:
            if waiter in self._stats_waiters:  # no list of dead waiters grows meanwhile
                self._stats_waiters.remove(waiter)
            return self._last_stats

    def _send(self, message: list) -> None:
        if not self._outgoing:
            try:
                asyncio.get_running_loop().call_soon(self._flush)
            except RuntimeError:  # no loop runs (a generator closed at exit): nothing to do
                return
        self._outgoing.append(message)

    def _flush(self) -> None:
        messages, self._outgoing = self._outgoing, []
        if messages and self._writer is not None and not self.engine_gone:
            self._writer.write(encode_frame(messages))

    # -- the engine's side --------------------------------------------------------------
    async def read_from(self, reader: asyncio.StreamReader) -> None:
        """Route what the engine sends until it closes the link."""
        frames = FrameReader()
        try:
            while True:
                # every frame that has arrived: a process that was behind (or waiting for
                # a core) routes several steps at once, and its handlers write one chunk
                # a choice for all of them
                data = await reader.read(RECEIVE_BYTES)
                if not data:
                    break
                self.handle(frames.feed(data))
        except ConnectionError:
            pass
        except LinkError as error:
            log.error("the engine process sent %s; stopping", error)
        self.close()

    def handle(self, messages: list) -> None:
        for message in messages:
            kind = message[0]
            if kind == "deltas":
                self.route([delta_from_wire(entry) for entry in message[1]])
            elif kind == "stats":
                self._last_stats = stats = ServingStats.from_wire(message[1])
                waiters, self._stats_waiters = self._stats_waiters, []
                for waiter in waiters:
                    if not waiter.done():
                        waiter.set_result(stats)
            elif kind == "stopping":
                self.accepting = False

    def route(self, deltas: list[Delta]) -> None:
        streams = self._streams
        for delta in deltas:
            stream = streams.get(delta.request_id)
            if stream is not None:  # else its handler has gone (client disconnected)
                stream.push(delta)
            if delta.finished:
                streams.pop(delta.request_id, None)
                if delta.request_id in self._live:
                    self._live.discard(delta.request_id)
                    self._reserved -= 1

    def close(self) -> None:
        """The engine has stopped: what is still open ends with finish_reason "abort"."""
        self.engine_gone = True
        self.accepting = False
        gone = [
            Delta(request_id, [], "", finished=True, finish_reason="abort")
            for request_id in list(self._live)
        ]
        self.route(gone)
        for waiter in self._stats_waiters:
            if not waiter.done():
                waiter.set_result(self._last_stats)
        self._stats_waiters = []


def build_app(
    engine: EngineClient,
    tokenizer,
    chat_template: ChatTemplate | None,
    max_body_bytes: int,
    metrics: ServerMetrics,
):
    app = FastAPI(title="ppruntime", docs_url=None, redoc_url=None)
    facts = engine.facts
    model_name = facts.served_name

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
            prompt_ids = encode_prompt(
                prompt, tokenizer, facts.model, facts.vocab_size, facts.max_model_len
            )
            for params in parsed.params:
                validate_request(
                    prompt_ids, params, facts.vocab_size, facts.max_model_len, tokenizer is not None
                )
        except (InvalidRequestError, ValueError) as error:
            raise _HTTPError(400, str(error).replace("SamplingParams.", "")) from None
        return prompt_ids

    def start(parsed: ParsedRequest, prompt_ids, prefix: str):
        """Submit one engine request per choice; their deltas land on the stream."""
        most = facts.capacity + facts.max_waiting
        if len(parsed.params) > most:  # never admitted: a 503 would be retried for ever
            raise _HTTPError(
                400,
                f"n={len(parsed.params)} exceeds the {most} requests this server holds at "
                "once (the engine's batch slots plus --max-waiting)",
            )
        if not engine.reserve(len(parsed.params)):
            if not engine.accepting:
                raise _HTTPError(503, "the server is shutting down", "unavailable")
            raise _HTTPError(503, "too many requests waiting; retry later", "overloaded")
        choices = [
            _Choice(index, engine.new_request_id(prefix)) for index in range(len(parsed.params))
        ]
        stream = engine.submit([choice.request_id for choice in choices], prompt_ids, parsed.params)
        return choices, stream

    def abandon(choices: list[_Choice]) -> None:
        """The handler ends before its choices did: abort them."""
        engine.abandon([choice.request_id for choice in choices if choice.finish_reason is None])

    def token_text(token: int) -> str:
        return tokenizer.decode([token]) if tokenizer is not None else str(token)

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
            return EventStreamResponse(events, on_never_started=lambda: abandon(choices))
        by_id = {choice.request_id: choice for choice in choices}
        try:
            while any(c.finish_reason is None for c in choices):
                for delta in await stream.take(request):
                    by_id[delta.request_id].add(delta)
        except asyncio.CancelledError:
            abandon(choices)
            raise
        except ConnectionAbortedError:  # the client has gone: no one reads an answer
            abandon(choices)
            return Response(status_code=CLIENT_GONE_STATUS)
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
                ).encode()
            # the chunk that finishes the last choice goes out with the usage and [DONE]:
            # one write (and one wake-up of the client) for the stream's end
            end = b""
            unfinished = len(choices)
            if unfinished == 1:  # the common case, each chunk a few dict and list less
                (choice,) = choices
                while unfinished:
                    deltas = await stream.take(request)
                    for delta in deltas:
                        choice.add(delta)
                    chunk = chunks.chunk(
                        [_stream_entry(choice, deltas, parsed, chunks, top_n)]
                    ).encode()
                    unfinished = choice.finish_reason is None
                    if unfinished:
                        yield chunk
                    else:
                        end = chunk
            while unfinished:
                # one entry per choice per chunk, however many deltas arrived for it
                arrived: dict[str, list[Delta]] = {}
                for delta in await stream.take(request):
                    by_id[delta.request_id].add(delta)
                    arrived.setdefault(delta.request_id, []).append(delta)
                entries = [
                    _stream_entry(by_id[request_id], deltas, parsed, chunks, top_n)
                    for request_id, deltas in arrived.items()
                ]
                unfinished = sum(c.finish_reason is None for c in choices)
                if entries and unfinished:
                    yield chunks.chunk(entries).encode()
                elif entries:
                    end = chunks.chunk(entries).encode()
            done = True
        except ConnectionAbortedError:  # the client has gone (the finally aborts)
            return
        else:
            if parsed.include_usage:
                completion_tokens = sum(len(c.token_ids) for c in choices)
                end += chunks.usage_chunk(usage(prompt_tokens, completion_tokens)).encode()
            yield end + STREAM_END
        finally:
            if not done:  # the client went away (or the server stops): free the blocks
                abandon(choices)

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
            "max_model_len": facts.max_model_len,
        }
        return {"object": "list", "data": [entry]}

    @app.get("/health")
    async def health():
        if not engine.accepting:
            return error_response(_HTTPError(503, "the server is shutting down", "unavailable"))
        return {"status": "ok"}

    @app.get("/metrics")
    async def prometheus_metrics():
        stats = await engine.stats()
        return PlainTextResponse(metrics.render(stats), media_type=metrics.content_type)

    return app

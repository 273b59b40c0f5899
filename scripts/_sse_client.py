"""A lean streaming client for bench_serve.py: HTTP/1.1 + server-sent events on asyncio.

The benchmark's clients run on the server's own cores (real clients are on other
machines), so every microsecond they spend parsing is taken from the server. httpx
and the openai client cost 60-220 us of CPU a streamed token here (their HTTP
machinery plus a `json.loads` a chunk); this client is an `asyncio.Protocol` (no
coroutine per read) on one keep-alive connection per stream, which decodes the
chunked body by hand and looks inside a chunk only as far as it must:

* a content chunk (`"finish_reason": null`) is one timestamp (its arrival);
* every other event is parsed as JSON: the chunk with the finish reason, the usage
  chunk (`stream_options.include_usage`, which gives the token count), an error;
* a stream counts only when it ended with `data: [DONE]` after a finish reason and
  the usage: anything else (a status other than 200, a closed connection, an error
  event, a missing usage) raises `StreamError`.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from urllib.parse import urlsplit

_NULL_FINISH = (b'"finish_reason": null', b'"finish_reason":null')
_DONE = b"data: [DONE]"


def stream_request(prompt, max_tokens: int) -> dict:
    """The benchmark's completion request: greedy, every token, streamed with usage."""
    return {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def run(coroutine):
    """`asyncio.run`, on uvloop's event loop when it is installed (it costs the clients
    less a chunk: they share the server's cores)."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coroutine)
    return uvloop.run(coroutine)


class StreamError(RuntimeError):
    """A streamed response that did not end as an OpenAI stream must."""


@dataclass
class StreamResult:
    """One streamed request: when it was sent, when each content chunk arrived."""

    start: float
    arrivals: list[float] = field(default_factory=list)
    completion_tokens: int | None = None
    finish_reason: str | None = None
    done: bool = False


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one streamed request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._events = bytearray()  # the body's server-sent-event text not yet split
        self._result: StreamResult | None = None
        self._finished: asyncio.Future | None = None
        self._status: int | None = None  # None while the head has not arrived
        self._chunked = False
        self._length = 0  # the body bytes still expected (Content-Length responses)
        self._chunk_left = -1  # bytes of the current chunk still to come; -1: read a size
        self.closed = False

    # -- asyncio.Protocol ---------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport

    def connection_lost(self, exc) -> None:
        self.closed = True
        self._fail(StreamError(f"the server closed the connection mid-response ({exc})"))

    def data_received(self, data: bytes) -> None:
        if self._finished is None or self._finished.done():
            return
        self._buffer += data
        try:
            self._parse()
        except StreamError as error:
            self._fail(error)

    # -- a request ----------------------------------------------------------------------
    async def stream(self, request: bytes) -> StreamResult:
        loop = asyncio.get_running_loop()
        self._finished = loop.create_future()
        self._result = StreamResult(time.perf_counter())
        self._status, self._chunk_left = None, -1
        self._buffer.clear()
        self._events.clear()
        self.transport.write(request)
        await self._finished
        return self._result

    def _fail(self, error: Exception) -> None:
        if self._finished is not None and not self._finished.done():
            self._finished.set_exception(error)

    def _parse(self) -> None:
        buffer = self._buffer
        if self._status is None:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                return
            self._read_head(bytes(buffer[:end]).decode("latin-1"))
            del buffer[: end + 4]
        if not self._chunked:
            self._length -= len(buffer)
            self._body(bytes(buffer))
            buffer.clear()
            if self._length <= 0:
                self._end()
            return
        position = 0
        while True:
            if self._chunk_left < 0:  # a chunk's size line
                end = buffer.find(b"\r\n", position)
                if end < 0:
                    break
                size = int(buffer[position:end].split(b";", 1)[0], 16)
                if size == 0:  # the last chunk: its size line, then the CRLF that ends it
                    if len(buffer) - (end + 2) < 2:  # (no trailers are sent)
                        break  # that CRLF may come in the next segment: keep the size line
                    del buffer[: end + 4]
                    self._end()
                    return
                position = end + 2
                self._chunk_left = size
            take = min(self._chunk_left, len(buffer) - position)
            if take:
                self._body(bytes(buffer[position : position + take]))
                position += take
                self._chunk_left -= take
            if self._chunk_left or len(buffer) - position < 2:
                break
            position += 2  # the CRLF after the chunk's data
            self._chunk_left = -1
        del buffer[:position]

    def _read_head(self, head: str) -> None:
        status_line, *lines = head.split("\r\n")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise StreamError(f"not an HTTP response: {status_line!r}")
        self._status = int(parts[1])
        headers = {}
        for line in lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip().lower()
        self._chunked = "chunked" in headers.get("transfer-encoding", "")
        self._length = int(headers.get("content-length", "0"))

    def _body(self, data: bytes) -> None:
        if self._status != 200:
            self._events += data  # kept for the error message
            return
        events = self._events
        events += data
        start = 0
        now = None
        while True:
            end = events.find(b"\n\n", start)
            if end < 0:
                break
            event = bytes(events[start:end])
            start = end + 2
            if event.startswith(b"data: {") and (
                _NULL_FINISH[0] in event or _NULL_FINISH[1] in event
            ):
                if now is None:
                    now = time.perf_counter()
                self._result.arrivals.append(now)
            else:
                self._other_event(event)
        del events[:start]

    def _other_event(self, event: bytes) -> None:
        result = self._result
        if event.startswith(_DONE):
            if result.finish_reason is None or result.completion_tokens is None:
                raise StreamError("[DONE] before a finish reason and the usage chunk")
            result.done = True
            return
        if not event.startswith(b"data: "):
            return  # a comment or another field: not part of the OpenAI stream
        chunk = json.loads(event[6:])
        if "error" in chunk:
            raise StreamError(f"the server sent an error: {chunk['error']}")
        for choice in chunk.get("choices") or []:
            if choice.get("error"):
                raise StreamError(f"the request failed: {choice['error']}")
            result.arrivals.append(time.perf_counter())
            if choice.get("finish_reason") is not None:
                result.finish_reason = choice["finish_reason"]
        if chunk.get("usage"):
            result.completion_tokens = int(chunk["usage"]["completion_tokens"])

    def _end(self) -> None:
        if self._status != 200:
            raise StreamError(f"HTTP {self._status}: {bytes(self._events)[:500]!r}")
        if not self._result.done:
            raise StreamError("the response ended without data: [DONE]")
        self._finished.set_result(None)


class StreamingClient:
    """POSTs streamed requests to `url`/v1/completions, one connection per open stream."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self._host = parts.hostname
        self._port = parts.port or 80
        self._idle: list[_Connection] = []
        self._head = (
            "POST /v1/completions HTTP/1.1\r\nHost: {host}\r\n"
            "Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            "Content-Length: {length}\r\n\r\n"
        ).replace("{host}", f"{self._host}:{self._port}")

    def body(self, prompt, max_tokens: int) -> bytes:
        """A request, encoded once (greedy, every token, with the usage chunk)."""
        payload = json.dumps(stream_request(prompt, max_tokens)).encode()
        return self._head.replace("{length}", str(len(payload))).encode() + payload

    async def stream(self, request: bytes) -> StreamResult:
        connection = None
        while self._idle and connection is None:
            candidate = self._idle.pop()
            connection = None if candidate.closed else candidate
        if connection is None:
            loop = asyncio.get_running_loop()
            _, connection = await loop.create_connection(_Connection, self._host, self._port)
        try:
            result = await connection.stream(request)
        except BaseException:
            connection.transport.close()
            raise
        self._idle.append(connection)
        return result

    def close(self) -> None:
        for connection in self._idle:
            connection.transport.close()
        self._idle.clear()

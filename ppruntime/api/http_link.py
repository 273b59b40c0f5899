"""The link between rank 0's engine process and its HTTP process: framed JSON batches.

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON: a list of
messages, each a list whose first item names it. Nothing else crosses the link (no
pickle: request bodies come from clients). One frame carries everything one side has
to say at that moment (an engine step's deltas, the submits of one event-loop pass),
or several in order where one would exceed MAX_FRAME_BYTES.

HTTP process -> engine:
    ["submit", request_id, prompt_ids, sampling_params_fields]
    ["abort", request_id]
    ["stats"]                          (answered by one "stats" message)
    ["listening", port] / ["failed", message]   (once, at start-up)
engine -> HTTP process:
    ["hello", settings]                (once, first)
    ["deltas", [delta, ...]]           (one per engine step at most; see `delta_to_wire`)
    ["stats", figures]                 (`ServingStats` fields)
    ["stopping"]                       (SIGTERM: refuse new requests)
The engine process closing its end means it has stopped (or died); so does the HTTP
process closing its end.
"""

from __future__ import annotations

import dataclasses
import json
import select
import socket
import struct
import time

from ppruntime.engine.sampling_params import SamplingParams

HEADER = struct.Struct(">I")
MAX_FRAME_BYTES = 256 * 2**20
RECEIVE_BYTES = 2**20
CLOSE_FLUSH_S = 10.0  # at close, how long a HTTP process that is behind gets to read the rest
_PARAM_FIELDS = tuple(field.name for field in dataclasses.fields(SamplingParams))
_SEQUENCE_FIELDS = ("stop", "stop_token_ids")


class LinkError(RuntimeError):
    """The other side sent something that is not a frame of our format."""


def encode_frame(messages: list) -> bytes:
    """The messages as one frame, or as several in order when one would exceed
    MAX_FRAME_BYTES (the submits of many long prompts, n choices each, in one pass)."""
    body = json.dumps(messages, separators=(",", ":")).encode()
    if len(body) <= MAX_FRAME_BYTES or len(messages) < 2:
        return HEADER.pack(len(body)) + body
    frames, group, size = bytearray(), [], 2
    for message in messages:
        part = json.dumps(message, separators=(",", ":")).encode()
        if group and size + len(part) + 1 > MAX_FRAME_BYTES:
            frames += _frame_of_parts(group)
            group, size = [], 2
        group.append(part)
        size += len(part) + 1
    return bytes(frames + _frame_of_parts(group))


def _frame_of_parts(parts: list[bytes]) -> bytes:
    body = b"[" + b",".join(parts) + b"]"
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> list:
    try:
        messages = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise LinkError(f"a frame that is not JSON: {error}") from None
    if not isinstance(messages, list) or not all(
        isinstance(message, list) and message and isinstance(message[0], str)
        for message in messages
    ):
        raise LinkError("a frame that is not a list of messages")
    return messages


class FrameReader:
    """Bytes in, whole frames' messages out (a frame may arrive in pieces)."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list:
        self._buffer += data
        messages: list = []
        buffer = self._buffer
        start = 0
        while len(buffer) - start >= HEADER.size:
            (size,) = HEADER.unpack_from(buffer, start)
            if size > MAX_FRAME_BYTES:
                raise LinkError(f"a frame of {size} bytes (at most {MAX_FRAME_BYTES})")
            end = start + HEADER.size + size
            if len(buffer) < end:
                break
            messages.extend(decode_body(bytes(buffer[start + HEADER.size : end])))
            start = end
        del buffer[:start]
        return messages


class EngineLink:
    """The engine process's end: non-blocking, so a slow HTTP process never stalls a step.

    `send` queues a frame and writes what the socket takes; the rest goes out with the
    next `send` or `receive`. `receive` returns the messages that arrived (waiting up to
    `timeout` seconds for some when there are none), or None once the other end closed.
    """

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._reader = FrameReader()
        self._out = bytearray()
        self._held: list = []
        self.closed = False

    def send(self, messages: list) -> None:
        if not self.closed:
            self._out += encode_frame(messages)
            self._flush()

    def _flush(self) -> None:
        while self._out and not self.closed:
            try:
                sent = self.sock.send(self._out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # the HTTP process has gone; receive() reports it
                self.closed = True
                return
            del self._out[:sent]

    def hold(self, messages: list) -> None:
        """Give messages back: the next `receive` returns them first (start-up reads up to
        "listening"; what came with it is the engine loop's)."""
        self._held = messages + self._held

    def receive(self, timeout: float = 0.0) -> list | None:
        if self.closed:
            return None
        messages, self._held = self._held, []
        if timeout > 0 and not messages:
            writers = [self.sock] if self._out else []
            select.select([self.sock], writers, [], timeout)  # a signal: back within timeout
        self._flush()
        while True:
            try:
                data = self.sock.recv(RECEIVE_BYTES)
            except (BlockingIOError, InterruptedError):
                return messages
            except OSError:
                data = b""
            if not data:
                self.closed = True
                return None
            messages.extend(self._reader.feed(data))
            if len(data) < RECEIVE_BYTES:
                return messages

    def close(self) -> None:
        """Send what is still queued (the last steps' deltas: a HTTP process that is behind
        would otherwise end those requests as aborted), waiting up to CLOSE_FLUSH_S for it
        to read, then close."""
        deadline = time.monotonic() + CLOSE_FLUSH_S
        self._flush()
        while self._out and not self.closed and time.monotonic() < deadline:
            select.select([], [self.sock], [], max(deadline - time.monotonic(), 0.0))
            self._flush()
        self.closed = True
        self.sock.close()


# -- message contents ------------------------------------------------------------------
def params_to_wire(params: SamplingParams) -> dict:
    fields = {name: getattr(params, name) for name in _PARAM_FIELDS}
    for name in _SEQUENCE_FIELDS:
        value = fields[name]
        fields[name] = [value] if isinstance(value, str) else list(value)
    return fields


def params_from_wire(fields: object) -> SamplingParams:
    """Only SamplingParams' own fields; its constructor validates them again."""
    if not isinstance(fields, dict) or set(fields) - set(_PARAM_FIELDS):
        raise LinkError(f"sampling parameters that are not SamplingParams fields: {fields!r}")
    values = dict(fields)
    for name in _SEQUENCE_FIELDS:
        if isinstance(values.get(name), list):
            values[name] = tuple(values[name])
    return SamplingParams(**values)


def delta_to_wire(delta) -> list:
    """A `RequestOutput` delta as [id, token ids, text, finished, finish reason, error,
    logprobs as [[token, log-prob], ...] per token or None], or a plain one (not finished,
    no log-probs: nearly every delta) as just [id, token ids, text]. Runs on the engine for
    every request every step: the token list is the engine's own (Python ints) when it is
    one."""
    tokens = delta.token_ids
    if type(tokens) is not list:
        tokens = [int(token) for token in tokens]
    logprobs = delta.logprobs
    if not delta.finished and not logprobs and delta.error is None:
        return [delta.request_id, tokens, delta.text]
    if logprobs:
        logprobs = [[[int(t), float(value)] for t, value in step.items()] for step in logprobs]
    return [
        delta.request_id,
        tokens,
        delta.text,
        delta.finished,
        delta.finish_reason,
        delta.error,
        logprobs or None,
    ]


@dataclasses.dataclass
class Delta:
    """A delta as the HTTP process sees it (the fields of `RequestOutput` it reads)."""

    request_id: str
    token_ids: list[int]
    text: str
    finished: bool = False
    finish_reason: str | None = None
    error: str | None = None
    logprobs: list[dict[int, float]] | None = None


def delta_from_wire(entry: list) -> Delta:
    if len(entry) == 3:  # a plain delta
        return Delta(entry[0], entry[1], entry[2])
    request_id, token_ids, text, finished, finish_reason, error, logprobs = entry
    if logprobs is not None:
        logprobs = [{token: value for token, value in step} for step in logprobs]
    return Delta(request_id, token_ids, text, finished, finish_reason, error, logprobs)

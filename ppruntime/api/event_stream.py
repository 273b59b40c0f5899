"""A streamed response of server-sent events: encoded chunks in, ASGI messages out, sent
from outside the framework's middleware.

A streamed token costs its chunk's `send` and a wake-up of the handler that makes it,
and both go through every layer between uvicorn and the route: FastAPI's and
starlette's middleware wrap `send` six deep, and a handler's coroutine is resumed through
some twenty frames. starlette's StreamingResponse adds a task group per response (a task
waiting for the disconnect) and checks and encodes every chunk. On a CPU-bound machine
that is most of what the HTTP process spends a token.

So the handler returns an `EventStreamResponse`; called by the framework, it only hands
itself to `streams_outside`'s wrapper around the app (the outermost ASGI layer), which
streams it once the framework has returned: from the connection's own task, through
uvicorn's own `send`. The handler's `_DeltaStream.take` polls notice a client that has
gone; closing the chunk iterator when the stream ends early (the server stopping) runs
its clean-up (aborting the requests), and a stream dropped before it started calls
its `on_never_started`. Without the wrapper (the app served as it is) the
response streams where it is called.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send

EVENT_STREAM_HEADERS = [(b"content-type", b"text/event-stream; charset=utf-8")]
DEFERRED_KEY = "ppruntime.deferred_streams"  # in the ASGI scope: where responses wait
STREAM_END = b"data: [DONE]\n\n"  # an OpenAI stream's last event


class EventStreamResponse(Response):
    """200, `text/event-stream`, chunked: each item of `chunks` is one body message."""

    media_type = "text/event-stream"

    def __init__(
        self,
        chunks: AsyncGenerator[bytes, None],
        on_never_started: Callable[[], None] | None = None,
    ) -> None:
        """`on_never_started`: the clean-up when the stream is dropped before its first
        chunk was asked for (closing a generator that never ran runs none of its code)."""
        self.chunks = chunks
        self.on_never_started = on_never_started
        self.status_code = 200
        self.background = None  # FastAPI may set its BackgroundTasks; run after the body
        self.raw_headers = list(EVENT_STREAM_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        deferred = scope.get(DEFERRED_KEY)
        if deferred is not None and not deferred:
            deferred.append(self)  # streamed by `streams_outside`, after the framework returns
            return
        await self.stream(send)

    async def stream(self, send: Send) -> None:
        """The head with the first chunk, then each chunk as it comes; a chunk ending in
        STREAM_END is the last and goes out with the body's end. (The head waits for the
        first chunk, so that the client is woken once for both: its two writes follow
        each other. A stream ended otherwise, the client gone, ends with an empty last
        chunk.)"""
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        ended = False
        try:
            async for chunk in self.chunks:
                if start is not None:
                    await send(start)
                    start = None
                ended = chunk.endswith(STREAM_END)
                await send({"type": "http.response.body", "body": chunk, "more_body": not ended})
                if ended:
                    break
        finally:
            await self.chunks.aclose()
        if start is not None:
            await send(start)
        if not ended:
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        if self.background is not None:
            await self.background()


def streams_outside(app: ASGIApp) -> ASGIApp:
    """`app` with its EventStreamResponses streamed outside it (see the module's notes)."""

    async def outermost(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await app(scope, receive, send)
            return
        deferred: list[EventStreamResponse] = []
        scope[DEFERRED_KEY] = deferred
        try:
            await app(scope, receive, send)
        except BaseException:
            for response in deferred:  # never started: its clean-up runs here
                if response.on_never_started is not None:
                    response.on_never_started()
                await response.chunks.aclose()
            raise
        for response in deferred:
            await response.stream(send)

    return outermost

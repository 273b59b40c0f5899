"""The serving path's pure parts: the link's frames (in pieces, malformed, a HTTP process
that does not read), what crosses it (sampling parameters, deltas), the HTTP process's
routing of deltas to the streams that coalesce them and its waiting-queue count, the
pre-encoded SSE chunks (the same JSON as building the chunk as a dict); serve's flag
range checks."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import threading

import pytest
from launching import REPO_ROOT, mpi_env

pytest.importorskip("fastapi", reason="the serve extras install fastapi")

from ppruntime.api import server
from ppruntime.api.http_link import (
    HEADER,
    MAX_FRAME_BYTES,
    Delta,
    EngineLink,
    FrameReader,
    LinkError,
    delta_from_wire,
    delta_to_wire,
    encode_frame,
    params_from_wire,
    params_to_wire,
)
from ppruntime.api.openai_protocol import (
    ProtocolError,
    StreamChunks,
    parse_chat_request,
    parse_completion_request,
)
from ppruntime.api.server import EngineClient, ModelFacts
from ppruntime.engine.outputs import RequestOutput
from ppruntime.engine.sampling_params import SamplingParams


def _delta(request_id: str, token: int, finished: bool = False) -> Delta:
    return Delta(request_id, [token], f"<{token}>", finished, "length" if finished else None)


def test_frames_arriving_in_pieces_are_decoded_whole_and_in_order():
    data = encode_frame([["a", 1], ["b"]]) + encode_frame([["c", "\u00e9 \U0001f600"]])
    reader = FrameReader()
    got = []
    for index in range(0, len(data), 3):  # three bytes at a time
        got.extend(reader.feed(data[index : index + 3]))
    assert got == [["a", 1], ["b"], ["c", "\u00e9 \U0001f600"]]
    assert reader.feed(b"") == []


@pytest.mark.parametrize(
    "frame",
    [
        HEADER.pack(5) + b"[1, 2",  # not JSON (cut short)
        HEADER.pack(2) + b"{}",  # not a list
        HEADER.pack(4) + b"[[]]",  # a message without a kind
        HEADER.pack(MAX_FRAME_BYTES + 1),  # too large
    ],
)
def test_a_malformed_frame_is_a_link_error(frame):
    with pytest.raises(LinkError):
        FrameReader().feed(frame)


def test_the_engine_end_never_waits_for_a_http_process_that_does_not_read():
    ours, theirs = socket.socketpair()
    link = EngineLink(ours)
    big = [["deltas", [["r", [1] * 1000, "x" * 1000, False, None, None, None]] * 100]]
    for _ in range(12):  # far more than a socket buffer holds; returns at once
        link.send(big)
    assert link.receive(0.01) == []  # nothing came; what is queued stays queued
    theirs.setblocking(True)
    reader, got = FrameReader(), []
    while len(got) < 12:
        got.extend(reader.feed(theirs.recv(2**20)))
        link.receive(0.0)  # the rest goes out as the other side reads
    assert got == big * 12
    theirs.sendall(encode_frame([["stats"]]))
    assert link.receive(1.0) == [["stats"]]
    theirs.close()
    assert link.receive(1.0) is None and link.closed  # the HTTP process has gone


def test_closing_the_engine_end_delivers_what_it_still_held():
    """At shutdown the engine closes the link after the last steps' deltas (a request that
    finished in the grace period); a HTTP process that was behind must still get them, or
    it ends those requests as aborted with their last tokens missing."""
    ours, theirs = socket.socketpair()
    link = EngineLink(ours)
    big = [["deltas", [["r", [1] * 1000, "x" * 1000, False, None, None, None]] * 100]]
    for _ in range(12):  # more than the socket buffer holds: some stays queued
        link.send(big)
    assert link._out, "the test needs bytes left in the engine end's buffer"
    got: list = []

    def read_all() -> None:
        reader = FrameReader()
        theirs.setblocking(True)
        while data := theirs.recv(2**20):
            got.extend(reader.feed(data))

    reading = threading.Thread(target=read_all)
    reading.start()  # the HTTP process reads on (it was only behind)
    link.close()
    reading.join(30)
    assert got == big * 12


def test_what_the_http_process_sends_while_starting_reaches_the_engine():
    """uvicorn accepts clients before the HTTP process says "listening": a /metrics scrape
    or a submit of that moment arrives with or before it and must not be dropped (a lost
    "stats" kept every later scrape from asking; a lost submit never ends)."""
    from ppruntime.api.cli_serve import _wait_until_listening

    ours, theirs = socket.socketpair()
    link = EngineLink(ours)
    submit = ["submit", "cmpl-1", [1, 2], params_to_wire(SamplingParams())]
    theirs.sendall(encode_frame([["stats"]]) + encode_frame([["listening", 1234], submit]))
    assert _wait_until_listening(link, http=None) == 1234
    assert link.receive(1.0) == [["stats"], submit]
    # an early message, and "listening" only 0.3 s later: the wait sleeps in between
    # (holding the early one back between reads made every read return at once: a spin)
    calls = []
    receive = link.receive
    link.receive = lambda timeout=0.0: calls.append(timeout) or receive(timeout)
    theirs.sendall(encode_frame([["stats"]]))
    threading.Timer(0.3, theirs.sendall, [encode_frame([["listening", 99]])]).start()
    assert _wait_until_listening(link, http=None) == 99
    assert len(calls) <= 10, f"{len(calls)} reads in 0.3 s"
    assert receive(1.0) == [["stats"]]
    theirs.close()


def test_the_http_process_runs_this_interpreter_with_its_flags():
    """-s (no user site-packages), -E (no PYTHON* variables), ...: the HTTP process must find
    the same modules as the engine process, not the ones those flags kept out."""
    show = "import json; from ppruntime.api.cli_serve import _http_process_command as c; "
    show += "print(json.dumps(c(5, 10)))"
    result = subprocess.run(
        [sys.executable, "-s", "-E", "-c", show],
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    command = json.loads(result.stdout)
    assert command[0] == sys.executable and {"-s", "-E"} <= set(command[1:-6]), command
    assert command[-6:] == ["-m", "ppruntime.api.http_process", "--fd", "5", "--nice", "10"]


def test_the_http_process_falls_back_to_asyncio_and_h11_saying_so_once():
    """With uvloop and httptools the HTTP process says nothing of them; made unimportable,
    it runs on asyncio's loop and h11 and says so once. (Each run's engine end is closed
    before the hello: the process's main returns 1 at once.)"""
    pytest.importorskip("uvloop", reason="the serve extras install uvloop")
    pytest.importorskip("httptools", reason="the serve extras install httptools")
    links = [socket.socketpair() for _ in range(2)]
    fds = [theirs.fileno() for _, theirs in links]
    code = (
        "import sys; from ppruntime.api import http_process as h\n"
        f"print(h.fast_stack(), h.main(['--fd', '{fds[0]}']), flush=True)\n"
        "print('blocked', file=sys.stderr, flush=True)\n"
        "sys.modules['uvloop'] = sys.modules['httptools'] = None\n"
        f"print(h.fast_stack(), h.main(['--fd', '{fds[1]}']))\n"
    )
    for ours, _ in links:
        ours.close()
    result = subprocess.run(
        [sys.executable, "-c", code],
        pass_fds=fds,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=120,
    )
    for _, theirs in links:
        theirs.close()
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["('uvloop', 'httptools') 1", "('asyncio', 'h11') 1"]
    before, _, after = result.stderr.partition("blocked\n")
    said = [line for line in after.splitlines() if "asyncio's event loop and h11" in line]
    assert "event loop" not in before and len(said) == 1, result.stderr


def test_sampling_params_and_deltas_cross_the_link_unchanged():
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, top_k=3, seed=11, stop=["a", "b"], logprobs=2
    )
    wire = json.loads(json.dumps(params_to_wire(params)))
    assert params_from_wire(wire) == params
    single = SamplingParams(stop="x", stop_token_ids=[5])
    assert params_from_wire(json.loads(json.dumps(params_to_wire(single)))) == single
    with pytest.raises(LinkError, match="__class__"):
        params_from_wire({"__class__": "os.system"})
    output = RequestOutput("r-1", [], [4, 5], "ab", finish_reason="stop", finished=True)
    output.logprobs = [{4: -0.5, 9: -1.5}, {5: -0.25}]
    delta = delta_from_wire(json.loads(json.dumps(delta_to_wire(output))))
    assert delta == Delta("r-1", [4, 5], "ab", True, "stop", None, output.logprobs)
    # a plain delta (running, no log-probs) crosses as [id, tokens, text] and reads back whole
    plain = RequestOutput("r-2", [], [6], "c")
    assert delta_to_wire(plain) == ["r-2", [6], "c"]
    assert delta_from_wire(json.loads(json.dumps(delta_to_wire(plain)))) == Delta("r-2", [6], "c")
    running_with_logprobs = RequestOutput("r-3", [], [6], "c", logprobs=[{6: -0.1}])
    assert delta_from_wire(delta_to_wire(running_with_logprobs)).logprobs == [{6: -0.1}]


class _Writer:
    """Stands in for the link's asyncio writer: records what is written."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.frames.append(data)


class _Connected:
    """Stands in for a request whose client stays (the streams poll it now and then)."""

    async def is_disconnected(self) -> bool:
        return False


_CONNECTED = _Connected()


def _client(capacity: int = 2, max_waiting: int = 1) -> EngineClient:
    facts = ModelFacts("tiny", "tiny", 256, 64, capacity=capacity, max_waiting=max_waiting)
    return EngineClient(facts, _Writer())


def test_a_stream_behind_takes_every_delta_in_one_batch():
    async def scenario():
        engine = _client(capacity=8)
        assert engine.reserve(3)
        stream = engine.submit(["r-1", "r-2"], [1, 2], [SamplingParams()] * 2)
        other = engine.submit(["r-3"], [1], [SamplingParams()])
        # three engine steps land before the handler runs
        engine.route([_delta("r-1", 0), _delta("r-3", 0), _delta("r-2", 0)])
        engine.route([_delta("r-1", 1), _delta("r-2", 1, finished=True)])
        engine.route([_delta("r-1", 2, finished=True), _delta("r-9", 0)])  # r-9: gone
        taken = await stream.take(_CONNECTED)
        assert [(d.request_id, d.token_ids[0]) for d in taken] == [
            ("r-1", 0),
            ("r-2", 0),
            ("r-1", 1),
            ("r-2", 1),
            ("r-1", 2),
        ]
        assert [d.request_id for d in await other.take(_CONNECTED)] == ["r-3"]
        engine.route([_delta("r-1", 3)])  # finished ids are no longer routed
        assert stream._pending == []
        await asyncio.sleep(0)  # the submits of one pass of the loop go out as one frame
        (frame,) = engine._writer.frames
        sent = FrameReader().feed(frame)
        assert [(kind, request_id) for kind, request_id, *_ in sent] == [
            ("submit", "r-1"),
            ("submit", "r-2"),
            ("submit", "r-3"),
        ]

    asyncio.run(scenario())


def test_submits_of_one_pass_larger_than_a_frame_go_out_as_several(monkeypatch):
    """n choices repeat the prompt; many long prompts in one event-loop pass must not make
    a frame the engine end refuses (a LinkError there ends the whole server)."""
    import ppruntime.api.http_link as http_link

    monkeypatch.setattr(http_link, "MAX_FRAME_BYTES", 64 * 1024)

    async def scenario():
        engine = _client(capacity=64)
        prompt = list(range(1, 4001))  # ~20 kB a submit
        ids = [f"r-{index}" for index in range(12)]
        engine.submit(ids, prompt, [SamplingParams()] * len(ids))
        await asyncio.sleep(0)
        frames = b"".join(engine._writer.frames)
        sent = FrameReader().feed(frames)  # raised LinkError: a frame over the limit
        assert [(kind, request_id) for kind, request_id, *_ in sent] == [
            ("submit", request_id) for request_id in ids
        ]
        assert all(message[2] == prompt for message in sent)

    asyncio.run(scenario())


def test_a_client_gone_is_noticed_while_its_tokens_still_flow():
    """A non-streamed request writes nothing until it ends, so only the disconnect poll can
    see its client go; tokens arriving every step must not keep it from polling (or the
    request runs to max_tokens, holding its KV blocks, for no one)."""

    class GoneClient:
        async def is_disconnected(self) -> bool:
            return True

    async def scenario():
        engine = _client(capacity=8)
        assert engine.reserve(1)
        stream = engine.submit(["r-1"], [1], [SamplingParams()])
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10 * server.DISCONNECT_POLL_S
        token = 0
        with pytest.raises(ConnectionAbortedError):
            while loop.time() < deadline:
                token += 1
                engine.route([_delta("r-1", token)])  # an engine step's token
                await stream.take(GoneClient())
                await asyncio.sleep(0.01)

    asyncio.run(scenario())


def test_a_streamed_response_is_sent_outside_the_middleware_in_few_writes():
    """The route's EventStreamResponse streams after the framework returned, through the
    outermost `send` (a middleware's wrapped send sees none of it): the head with the
    first chunk, each chunk a message, the last (ending in [DONE]) with the body's end.
    A stream the framework never got to start (an exception above it) is closed, which
    runs its clean-up."""
    from fastapi import FastAPI

    from ppruntime.api.event_stream import STREAM_END, EventStreamResponse, streams_outside

    closed, dropped, generators = [], [], []

    async def chunks(parts):
        try:
            for part in parts:
                await asyncio.sleep(0)
                yield part
        finally:
            closed.append(parts[0])

    class Watching:  # a pure ASGI middleware that counts what passes its send
        def __init__(self, app) -> None:
            self.app, self.seen = app, []

        async def __call__(self, scope, receive, send):
            async def counted(message):
                self.seen.append(message["type"])
                await send(message)

            await self.app(scope, receive, counted)

    app = FastAPI()
    app.add_middleware(Watching)

    @app.post("/stream")
    async def stream():
        generators.append(chunks([b"data: 1\n\n", b"data: 2\n\n" + STREAM_END]))
        return EventStreamResponse(generators[-1], on_never_started=lambda: dropped.append(1))

    async def call(asgi, path: str) -> list:
        sent = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": path,
            "headers": [],
            "query_string": b"",
            "root_path": "",
            "scheme": "http",
            "server": ("127.0.0.1", 80),
            "client": ("127.0.0.1", 1),
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "raw_path": path.encode(),
        }
        await asgi(scope, receive, send)
        return sent

    sent = asyncio.run(call(streams_outside(app), "/stream"))
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert sent[0]["status"] == 200
    assert dict(sent[0]["headers"])[b"content-type"] == b"text/event-stream; charset=utf-8"
    assert [(m["body"], m["more_body"]) for m in sent[1:]] == [
        (b"data: 1\n\n", True),
        (b"data: 2\n\n" + STREAM_END, False),
    ]
    assert app.middleware_stack is not None  # built on the first call
    watching = app.middleware_stack
    while not isinstance(watching, Watching):
        watching = watching.app
    assert watching.seen == [] and closed == [b"data: 1\n\n"]

    # without the wrapper the response streams where the framework calls it (the same
    # messages, through the middleware)
    sent = asyncio.run(call(app, "/stream"))
    assert len(sent) == 3 and sent[2]["more_body"] is False
    assert watching.seen == [m["type"] for m in sent]

    async def failing(scope, receive, send):  # the framework fails after the route ran
        await app(scope, receive, send)
        raise RuntimeError("after the route")

    assert dropped == []
    with pytest.raises(RuntimeError, match="after the route"):
        asyncio.run(call(streams_outside(failing), "/stream"))
    assert dropped == [1] and generators[-1].ag_frame is None  # cleaned up and closed


def test_a_stream_failing_before_its_first_chunk_has_sent_nothing_and_after_it_no_end():
    """An exception from the chunks before the first: no head went out (uvicorn can still
    answer 500); after it: the head and the chunks so far, no end of the body (uvicorn
    closes the connection: the client sees a cut stream, not a complete one). The
    generator's clean-up runs either way."""
    from ppruntime.api.event_stream import EventStreamResponse

    cleaned = []

    async def chunks(count: int):
        try:
            for index in range(count):
                yield b"data: %d\n\n" % index
            raise RuntimeError("the stream failed")
        finally:
            cleaned.append(count)

    async def run(count: int) -> list:
        sent = []

        async def send(message):
            sent.append(message)

        with pytest.raises(RuntimeError, match="the stream failed"):
            await EventStreamResponse(chunks(count)).stream(send)
        return sent

    assert asyncio.run(run(0)) == [] and cleaned == [0]
    sent = asyncio.run(run(2))
    assert [m["type"] for m in sent] == ["http.response.start"] + ["http.response.body"] * 2
    assert all(m["more_body"] for m in sent[1:]) and cleaned == [0, 2]


def test_a_scrape_asks_again_when_the_last_ask_went_unanswered(monkeypatch):
    """One "stats" the engine never answered (lost, or a step longer than the wait) must not
    keep later scrapes from asking: /metrics would show the same figures for good."""
    monkeypatch.setattr(server, "STATS_WAIT_S", 0.05)

    async def scenario():
        engine = _client()
        await engine.stats()  # no answer: the last figures
        await engine.stats()
        sent = FrameReader().feed(b"".join(engine._writer.frames))
        assert sent == [["stats"], ["stats"]]
        assert engine._stats_waiters == []  # the scrapes that gave up are not kept

    asyncio.run(scenario())


def test_the_waiting_queue_counts_until_the_engine_says_finished():
    async def scenario():
        engine = _client(capacity=2, max_waiting=1)
        assert engine.reserve(2) and engine.reserve(1)  # two run, one waits
        assert not engine.reserve(1)  # full: 503
        engine.submit(["a", "b"], [1], [SamplingParams()] * 2)
        engine.submit(["c"], [1], [SamplingParams()])
        engine.abandon(["a"])  # a client gone: aborted, but it holds room until it ends
        assert not engine.reserve(1)
        engine.route([_delta("a", 0, finished=True)])
        assert engine.reserve(1)
        engine.handle([["stopping"]])
        assert not engine.accepting and not engine.reserve(1)
        left = engine.submit(["d"], [1], [SamplingParams()])
        engine.close()  # the engine process has gone: what is open ends as aborted
        taken = await left.take(_CONNECTED)
        assert [(d.request_id, d.finish_reason) for d in taken] == [("d", "abort")]

    asyncio.run(scenario())


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("include_usage", [False, True])
def test_pre_encoded_chunks_are_the_openai_chunk_json(chat, include_usage):
    chunks = StreamChunks("cmpl-x", 1234, 'model "q"', chat, include_usage)
    kind = "chat.completion.chunk" if chat else "text_completion"

    def expected(entries, usage=None):
        body = {"id": "cmpl-x", "object": kind, "created": 1234, "model": 'model "q"'}
        body["choices"] = entries
        if include_usage:
            body["usage"] = usage
        return body

    def parse(chunk: str) -> dict:
        assert chunk.startswith("data: ") and chunk.endswith("\n\n")
        return json.loads(chunk[len("data: ") :])

    def entry(index, text, finish, **extra):
        body = {"index": index, "logprobs": extra.pop("logprobs", None), "finish_reason": finish}
        if chat:
            body["delta"] = {"content": text} if text else {}
        else:
            body["text"] = text
        return body | extra

    text = 'quote " back \\ newline \n \u00e9 \U0001f600'
    got = parse(chunks.chunk([chunks.entry(0, text, None), chunks.entry(1, "", "stop")]))
    assert got == expected([entry(0, text, None), entry(1, "", "stop")])
    logprobs = {"content": [{"token": "a", "logprob": -0.5}]}
    got = parse(chunks.chunk([chunks.entry(2, "a", "length", logprobs, error="boom")]))
    assert got == expected([entry(2, "a", "length", logprobs=logprobs, error="boom")])
    if chat:
        got = parse(chunks.chunk([chunks.entry(0, "", None, role="assistant")]))
        assert got["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    got = parse(chunks.usage_chunk(usage))
    assert got == {**expected([], usage), "usage": usage}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("max_tokens", True),  # bool is an int subclass: JSON's true is not a count
        ("n", True),
        ("seed", False),
        ("top_k", True),
        ("logprobs", True),
        ("temperature", True),
        ("top_p", False),
        ("min_p", True),
        ("prompt", [1, True]),
        ("stop_token_ids", [True]),
        ("max_tokens", 2.0),  # a float with an int's value is not an int
        ("n", 1.0),
        ("top_k", 1.0),
        ("temperature", float("nan")),  # json.loads reads NaN and Infinity
        ("top_p", float("inf")),
    ],
)
def test_a_request_field_of_the_wrong_kind_is_refused_naming_it(field, value):
    with pytest.raises(ProtocolError, match=field):
        parse_completion_request({"prompt": "hi", field: value})


def test_request_numbers_of_the_right_kind_pass_as_given():
    parsed = parse_completion_request(
        json.loads('{"prompt": [1, 2], "max_tokens": 3, "temperature": 1, "top_p": 0.5, "n": 2}')
    )
    assert parsed.prompt == [1, 2] and [p.max_tokens for p in parsed.params] == [3, 3]
    assert parsed.params[0].temperature == 1 and parsed.params[0].top_p == 0.5
    messages = [{"role": "user", "content": "x"}]
    with pytest.raises(ProtocolError, match="top_logprobs"):
        parse_chat_request({"messages": messages, "logprobs": True, "top_logprobs": True})
    assert (
        parse_chat_request({"messages": messages, "logprobs": True, "top_logprobs": 2}).num_logprobs
        == 2
    )


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--max-waiting", "-1", "--max-waiting must be >= 0, got -1"),
        ("--shutdown-grace", "-1", "--shutdown-grace must be >= 0, got -1.0"),
        ("--http-nice", "20", "--http-nice must be in [0, 19], got 20"),
    ],
)
def test_serve_refuses_a_flag_out_of_range_naming_it(flag, value, message):
    command = [sys.executable, "-m", "ppruntime", "serve", "--preset", "null", flag, value]
    result = subprocess.run(
        command, cwd=str(REPO_ROOT), env=mpi_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert message in result.stderr


def test_latency_counts_stay_bounded_and_render_as_prometheus_histograms():
    """The engine keeps latencies as bucket counts (not a list that grows until the next
    scrape); the HTTP process renders them as histograms that parse, with cumulative
    buckets (value <= bound), the count and the sum."""
    from prometheus_client.parser import text_string_to_metric_families

    from ppruntime.api.server_metrics import (
        LATENCY_BUCKETS,
        LatencyCounts,
        ServerMetrics,
        ServingStats,
    )

    ttft = LatencyCounts()
    for seconds in [0.001, 0.002, 0.03, 20.0] + [0.004] * 10_000:
        ttft.observe(seconds)
    wire = ttft.to_wire()
    assert len(wire[0]) == len(LATENCY_BUCKETS) + 1  # the same size after 10004 values
    stats = ServingStats(ttft=LatencyCounts.from_wire(wire), itl=LatencyCounts())
    text = ServerMetrics().render(stats).decode()
    samples = {
        (sample.name, sample.labels.get("le")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }
    name = "ppruntime_time_to_first_token_seconds"
    assert samples[(f"{name}_bucket", "0.001")] == 1  # le: 0.001 itself is in
    assert samples[(f"{name}_bucket", "0.0025")] == 2
    assert samples[(f"{name}_bucket", "0.005")] == 10_002
    assert samples[(f"{name}_bucket", "0.05")] == 10_003
    assert samples[(f"{name}_bucket", "10.0")] == 10_003
    assert samples[(f"{name}_bucket", "+Inf")] == samples[(f"{name}_count", None)] == 10_004
    assert abs(samples[(f"{name}_sum", None)] - (0.033 + 20.0 + 40.0)) < 1e-6
    assert samples[("ppruntime_inter_token_latency_seconds_count", None)] == 0
    with pytest.raises(ValueError, match="needs 14 counts, got 2"):
        LatencyCounts.from_wire([[1, 2], 0.0])
    itl = LatencyCounts()  # a delta of 3 tokens 0.03 s after the last: 3 gaps of 0.01 s
    itl.observe(0.01, 3)
    assert sum(itl.counts) == 3 and itl.counts[LATENCY_BUCKETS.index(0.01)] == 3
    assert abs(itl.sum_s - 0.03) < 1e-12


def test_the_engine_counts_one_inter_token_gap_a_token():
    """EngineDriver._send: the first delta of a request gives its time to first token, a
    later delta of k tokens k inter-token gaps (its wait shared), and /metrics gets them."""
    from ppruntime.api.serving import EngineDriver
    from ppruntime.engine.outputs import RequestOutput

    class Link:
        def __init__(self):
            self.sent = []

        def send(self, messages):
            self.sent.extend(messages)

    driver = EngineDriver(llm=None, link=Link())
    driver._running.add("r")
    driver._submitted_at["r"] = 0.0
    driver._send([RequestOutput("r", [1], [7], "a")])
    driver._send([RequestOutput("r", [1], [8, 9, 10], "bcd")])
    assert sum(driver._ttft.counts) == 1
    assert sum(driver._itl.counts) == 3
    assert driver._generated_tokens == 4
    assert [message[0] for message in driver.link.sent] == ["deltas", "deltas"]


@pytest.mark.parametrize("seed", [-1, 2**63, 2**64, -(2**70)])
def test_a_seed_outside_the_engines_range_is_refused_not_wrapped(seed):
    """The engine takes seeds in [0, 2**63); the choices' seeds (seed + index) wrap only
    inside that range, so a client's 2**64 is not silently seed 0."""
    with pytest.raises(ProtocolError, match=rf"seed.*2\*\*63.*{seed}|seed.*{seed}.*2\*\*63"):
        parse_completion_request({"prompt": "hi", "seed": seed})
    parsed = parse_completion_request({"prompt": "hi", "seed": 2**63 - 1, "n": 2})
    assert [p.seed for p in parsed.params] == [2**63 - 1, 0]

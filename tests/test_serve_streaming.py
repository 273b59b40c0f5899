"""The streaming path's pure parts: the engine-to-loop outbox (one wake-up per batch,
paced by the HTTP time share), the per-request streams that coalesce deltas, and the
pre-encoded SSE chunks (the same JSON as building the chunk as a dict); the pacing
flags' range checks."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
from launching import REPO_ROOT, mpi_env

pytest.importorskip("fastapi", reason="the serve extras install fastapi")

from ppruntime.api import serving
from ppruntime.api.openai_protocol import StreamChunks
from ppruntime.api.server import _Router
from ppruntime.api.serving import DeltaOutbox
from ppruntime.engine.outputs import RequestOutput


class _RecordingLoop:
    """Stands in for an event loop: call_soon_threadsafe only records."""

    def __init__(self) -> None:
        self.scheduled: list = []

    def call_soon_threadsafe(self, callback) -> None:
        self.scheduled.append(callback)

    def run_scheduled(self) -> None:
        callbacks, self.scheduled = self.scheduled, []
        for callback in callbacks:
            callback()


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _delta(request_id: str, token: int, finished: bool = False) -> RequestOutput:
    output = RequestOutput(request_id, [], [token], f"<{token}>")
    output.finished = finished
    return output


@pytest.fixture
def clock(monkeypatch) -> _Clock:
    fake = _Clock()
    monkeypatch.setattr(serving.time, "monotonic", fake)
    return fake


def test_outbox_wakes_the_loop_once_until_it_drains(clock):
    loop, delivered = _RecordingLoop(), []
    outbox = DeltaOutbox(loop, delivered.append, share=1.0)
    for token in range(5):  # five engine steps before the loop runs
        outbox.put([_delta("a", token), _delta("b", token)])
    assert len(loop.scheduled) == 1 and outbox.wakeups == 1
    loop.run_scheduled()
    assert len(delivered) == 1
    assert [(d.request_id, d.token_ids[0]) for d in delivered[0]] == [
        (request_id, token) for token in range(5) for request_id in ("a", "b")
    ]
    outbox.put([_delta("a", 5)])
    assert len(loop.scheduled) == 1  # drained: the next step wakes it again


def test_outbox_rests_after_a_costly_burst_except_for_urgent_deltas(clock):
    loop, delivered = _RecordingLoop(), []
    outbox = DeltaOutbox(loop, delivered.append, share=0.2)
    outbox.put([_delta("a", 0)], urgent={"a"})
    loop.run_scheduled()
    outbox.burst_ended(0.01)  # HTTP took 10 ms: rest 40 ms (share 0.2)
    clock.now += 0.039
    outbox.put([_delta("a", 1), _delta("b", 0)])
    outbox.flush_due()
    assert loop.scheduled == []  # resting: the tokens wait
    outbox.put([_delta("c", 0), _delta("b", 1, finished=True)], urgent={"c", "b"})
    assert len(loop.scheduled) == 1  # a first token (c) or a finish (b) does not
    loop.run_scheduled()
    # during the rest only the urgent requests' deltas go, each request's in order
    assert [(d.request_id, d.token_ids[0]) for d in delivered[-1]] == [
        ("b", 0),
        ("c", 0),
        ("b", 1),
    ]
    outbox.burst_ended(0.002)  # its cost adds to the rest: 40 + 8 ms from the start
    clock.now += 0.0085
    outbox.flush_due()
    assert loop.scheduled == []
    clock.now += 0.001
    outbox.flush_due()  # the rest is over: what waited goes out
    assert len(loop.scheduled) == 1
    loop.run_scheduled()
    assert [(d.request_id, d.token_ids[0]) for d in delivered[-1]] == [("a", 1)]


def test_outbox_refuses_a_share_out_of_range():
    with pytest.raises(ValueError, match="share"):
        DeltaOutbox(_RecordingLoop(), print, share=0.0)


def test_a_stream_behind_takes_every_delta_in_one_batch():
    async def scenario():
        loop = asyncio.get_running_loop()
        router = _Router(loop, http_share=1.0)
        stream = router.open(["r-1", "r-2"])
        other = router.open(["r-3"])
        # three engine steps land before the handler runs
        router._deliver([_delta("r-1", 0), _delta("r-3", 0), _delta("r-2", 0)])
        router._deliver([_delta("r-1", 1), _delta("r-2", 1, finished=True)])
        router._deliver([_delta("r-1", 2, finished=True), _delta("r-9", 0)])  # r-9: gone
        taken = await stream.take(request=None)
        assert [(d.request_id, d.token_ids[0]) for d in taken] == [
            ("r-1", 0),
            ("r-2", 0),
            ("r-1", 1),
            ("r-2", 1),
            ("r-1", 2),
        ]
        assert [d.request_id for d in await other.take(request=None)] == ["r-3"]
        router._deliver([_delta("r-1", 3)])  # finished ids are no longer routed
        assert stream._pending == []

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
    ("flag", "value"), [("--http-time-share", "0"), ("--gil-switch-interval-ms", "0")]
)
def test_serve_refuses_a_pacing_flag_out_of_range_naming_it(flag, value):
    command = [sys.executable, "-m", "ppruntime", "serve", "--preset", "null", flag, value]
    result = subprocess.run(
        command, cwd=str(REPO_ROOT), env=mpi_env(), capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2, result.stderr
    assert f"{flag} must be in" in result.stderr and f"got {float(value)}" in result.stderr

"""`ppruntime serve` as users run it: a real server under `mpirun -n 2` on the tiny model,
queried with the official `openai` client, checked against `LLM.generate` in this
process; and a one-process server on a checkpoint with a chat template and small
limits, for chat, the 503 and 413 answers. Both servers end with SIGTERM."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from launching import (
    REPO_ROOT,
    _session_members,
    has_exited,
    kill_job,
    mpi_command,
    mpi_env,
    start_process,
)
from model_fixtures import make_tiny_checkpoint

from ppruntime import LLM, SamplingParams

openai = pytest.importorskip("openai", reason="the test extras install the openai client")

START_TIMEOUT_S = 120
STOP_TIMEOUT_S = 60
PROMPTS = ["hello", "once upon a time", "the pipeline"]
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def start_serve(args: list[str], ranks: int = 1) -> subprocess.Popen:
    """`ppruntime serve ARGS` in a session of its own, output (both streams) on stdout."""
    command = [sys.executable, "-m", "ppruntime", "serve", *args]
    if ranks > 1:
        command = mpi_command(ranks, command)
    return start_process(command, mpi_env(), merge_stderr=True)


class Server:
    """A `ppruntime serve` job on a free port; stop() sends SIGTERM and waits."""

    def __init__(self, args: list[str], ranks: int = 1) -> None:
        self.proc = start_serve(["--port", "0", *args], ranks)
        self.lines: list[str] = []
        self.listening = threading.Event()
        self.url = ""
        self.http_pid = 0  # the HTTP process (rank 0 starts it)
        self.rank_zero_pid = 0
        threading.Thread(target=self._read, daemon=True).start()
        if not self.listening.wait(START_TIMEOUT_S):
            output = self.output()
            kill_job(self.proc)
            raise AssertionError(f"the server did not start:\n{output}")

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].split()[0]
                self.http_pid = int(line.split("HTTP process pid ")[1].split(")")[0])
                self.rank_zero_pid = int(line.split("rank 0 pid ")[1].split(",")[0])
                self.listening.set()

    def output(self) -> str:
        return "".join(self.lines)[-6000:]

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="unused", max_retries=0)

    def metrics(self) -> dict[str, float]:
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        return {
            sample.name + json.dumps(sample.labels, sort_keys=True) * bool(sample.labels): (
                sample.value
            )
            for family in text_string_to_metric_families(text)
            for sample in family.samples
        }

    def stop(self) -> int:
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            output = self.output()
            kill_job(self.proc)
            raise AssertionError(
                f"the server did not stop within {STOP_TIMEOUT_S}s:\n{output}"
            ) from None


@pytest.fixture(scope="module")
def offline():
    """The greedy and seeded outputs of PROMPTS from the Python API, in this process."""
    with LLM(preset="tiny", max_batch_size=8) as llm:
        greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, logprobs=2))
        seeded = llm.generate(
            ["hello"] * 2,
            [SamplingParams(max_tokens=12, temperature=1.0, seed=s) for s in (7, 8)],
        )
    return greedy, seeded


@pytest.fixture(scope="module")
def pipeline_server():
    # the grace outlasts the SIGTERM test's 400-token request however loaded the machine
    args = ["--preset", "tiny", "--max-batch-size", "16", "--shutdown-grace", "120"]
    server = Server(args, ranks=2)
    yield server
    if server.proc.poll() is None:
        server.stop()


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory):
    directory = make_tiny_checkpoint(tmp_path_factory.mktemp("chat"), "llama", with_tokenizer=True)
    config_path = directory / "tokenizer_config.json"
    settings = json.loads(config_path.read_text())
    settings.update(chat_template=CHAT_TEMPLATE, bos_token="<s>")
    config_path.write_text(json.dumps(settings))
    args = ["--model", str(directory), "--max-batch-size", "1", "--num-microbatches", "1"]
    args += ["--max-waiting", "1", "--max-body-bytes", "2048", "--max-model-len", "64"]
    server = Server([*args, "--log-dir", str(directory / "logs")])
    server.log_dir = directory / "logs"
    yield server
    if server.proc.poll() is None:
        server.stop()


def test_completions_equal_offline_greedy(pipeline_server, offline):
    greedy, _ = offline
    client = pipeline_server.client()
    for prompt, expected in zip(PROMPTS, greedy):
        response = client.completions.create(
            model="tiny", prompt=prompt, max_tokens=12, temperature=0, logprobs=2
        )
        choice = response.choices[0]
        assert choice.text == expected.text
        assert choice.finish_reason == "length"
        assert response.usage.completion_tokens == len(expected.token_ids)
        assert response.usage.prompt_tokens == len(expected.prompt_token_ids)
        chosen = [step[token] for step, token in zip(expected.logprobs, expected.token_ids)]
        assert choice.logprobs.token_logprobs == pytest.approx(chosen, abs=1e-5)
        # keyed by token text: two byte tokens that both decode to "\ufffd" share a key
        assert all(1 <= len(top) <= 2 for top in choice.logprobs.top_logprobs)
        assert max(len(top) for top in choice.logprobs.top_logprobs) == 2


def test_streamed_completion_concatenates_to_offline(pipeline_server, offline):
    greedy, _ = offline
    stream = pipeline_server.client().completions.create(
        model="tiny",
        prompt=PROMPTS[1],
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == greedy[1].text
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish[-1] == "length" and all(f is None for f in finish[:-1])
    assert chunks[-1].usage.completion_tokens == 12


def test_a_streamed_n_2_with_logprobs_and_usage_is_two_greedy_choices(pipeline_server, offline):
    """The n-choice streaming path (the last choice's chunk goes out with the usage and
    [DONE]): each choice streams the greedy text and its log-probs, finishes once, last;
    the usage chunk, after every choice finished, counts both."""
    greedy, _ = offline
    stream = pipeline_server.client().completions.create(
        model="tiny",
        prompt=PROMPTS[2],
        max_tokens=12,
        temperature=0,
        n=2,
        logprobs=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    expected = greedy[2]
    chosen = [step[token] for step, token in zip(expected.logprobs, expected.token_ids)]
    for index in (0, 1):
        entries = [e for c in chunks for e in c.choices if e.index == index]
        assert "".join(e.text for e in entries) == expected.text
        logprobs = [value for e in entries for value in e.logprobs.token_logprobs]
        assert logprobs == pytest.approx(chosen, abs=1e-5)
        assert [e.finish_reason for e in entries][-1] == "length"
        assert all(e.finish_reason is None for e in entries[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 24
    assert all(c.usage is None for c in chunks[:-1])


def test_the_http_process_runs_without_torch_or_mpi(pipeline_server):
    """The HTTP process loads the tokenizer, the chat template and FastAPI, not torch (the
    preset's byte tokenizer needs none): ~1.5 s of CPU and ~300 MB less on rank 0's node;
    nor the MPI library, which it must never start."""
    maps = Path(f"/proc/{pipeline_server.http_pid}/maps").read_text()
    assert "libtorch" not in maps and "libmpi" not in maps
    assert "libmpi" in Path(f"/proc/{pipeline_server.rank_zero_pid}/maps").read_text()
    assert "libtorch" in Path(f"/proc/{pipeline_server.rank_zero_pid}/maps").read_text()


def test_a_raw_stream_is_server_sent_events_and_the_connection_is_kept_alive(
    pipeline_server, offline
):
    """What a raw SSE reader sees: HTTP/1.1 200, text/event-stream, chunked; every event
    `data: <json>\\n\\n`, the last `data: [DONE]\\n\\n` and then the chunked body's end; the
    same connection then serves the next request."""
    greedy, _ = offline
    body = json.dumps({"prompt": PROMPTS[0], "max_tokens": 12, "temperature": 0, "stream": True})
    request = (
        f"POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n\r\n{body}"
    ).encode()
    with socket.create_connection(_host_port(pipeline_server.url), timeout=60) as sock:
        reader = sock.makefile("rb")
        for _ in range(2):  # the second on the kept-alive connection
            sock.sendall(request)
            assert reader.readline() == b"HTTP/1.1 200 OK\r\n"
            headers = {}
            while (line := reader.readline()) != b"\r\n":
                name, value = line.decode().rstrip("\r\n").split(": ", 1)
                headers[name.lower()] = value
            assert headers["content-type"] == "text/event-stream; charset=utf-8", headers
            assert headers["transfer-encoding"] == "chunked" and "connection" not in headers
            payload = b""
            while size := int(reader.readline(), 16):  # until the last chunk, 0
                payload += reader.read(size)
                assert reader.read(2) == b"\r\n"
            assert reader.read(2) == b"\r\n"  # the chunked body's end: no trailers
            events = payload.decode().split("\n\n")
            assert events[-2:] == ["data: [DONE]", ""], events[-3:]
            assert all(event.startswith("data: {") for event in events[:-2]), events
            parsed = [json.loads(event.removeprefix("data: ")) for event in events[:-2]]
            assert "".join(e["choices"][0]["text"] for e in parsed) == greedy[0].text
            assert [e["choices"][0]["finish_reason"] for e in parsed][-1] == "length"


def test_n_choices_with_a_seed_are_the_seeded_requests(pipeline_server, offline):
    _, seeded = offline
    client = pipeline_server.client()
    first = client.completions.create(model="tiny", prompt="hello", max_tokens=12, n=2, seed=7)
    again = client.completions.create(model="tiny", prompt="hello", max_tokens=12, n=2, seed=7)
    texts = [choice.text for choice in sorted(first.choices, key=lambda c: c.index)]
    assert texts == [output.text for output in seeded]  # choice i uses seed + i
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]


def test_64_concurrent_streams_complete(pipeline_server, offline):
    greedy, _ = offline

    async def one(client, index):
        stream = await client.completions.create(
            model="tiny", prompt=PROMPTS[index % 3], max_tokens=12, temperature=0, stream=True
        )
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return index, text, reason

    async def many():
        client = openai.AsyncOpenAI(
            base_url=f"{pipeline_server.url}/v1", api_key="unused", max_retries=0, timeout=120
        )
        return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(many())
    assert len(results) == 64
    for index, text, reason in results:
        assert reason == "length"
        assert text == greedy[index % 3].text


def test_the_benchmark_clients_count_every_token_and_check_each_stream_ends(pipeline_server):
    """bench_serve.py's lean client (raw HTTP/1.1 + SSE) and its httpx one, against the
    real server: every stream's usage says all its tokens came, each ended with [DONE];
    an error answer fails the stream instead of counting as one."""
    sys.path.insert(0, str(REPO_ROOT / "scripts"))
    import bench_serve
    from _sse_client import StreamError, StreamingClient

    prompts = [[1, 2, 3, 4], [5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    for kind in ("lean", "httpx"):
        record, window, timed_out = asyncio.run(
            bench_serve._clients(pipeline_server.url, prompts, 3, 6, 120.0, kind=kind)
        )
        assert not timed_out and window > 0, kind
        assert sorted(tokens for _, _, tokens in record) == [6] * 4, (kind, record)
        for start, arrivals, _ in record:
            # a chunk carries one token or several (paced), never none; in order
            assert 1 <= len(arrivals) <= 6 and start <= arrivals[0], (kind, arrivals)
            assert arrivals == sorted(arrivals), kind

    async def refused():
        client = StreamingClient(pipeline_server.url)
        try:
            await client.stream(client.body([1, 2], max_tokens=-1))
        finally:
            client.close()

    with pytest.raises(StreamError, match="HTTP 400.*max_tokens"):
        asyncio.run(refused())


def test_disconnect_mid_stream_frees_the_blocks(pipeline_server):
    body = {"prompt": "hello", "max_tokens": 400, "temperature": 0, "stream": True}
    body["ignore_eos"] = True
    with (
        httpx.Client(timeout=60) as client,
        client.stream("POST", f"{pipeline_server.url}/v1/completions", json=body) as response,
    ):
        lines = response.iter_lines()
        received = [next(lines) for _ in range(6)]
        assert any(line.startswith("data: ") for line in received)
        assert pipeline_server.metrics()["ppruntime_kv_blocks_used"] > 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        metrics = pipeline_server.metrics()
        if metrics["ppruntime_kv_blocks_used"] == 0 and metrics["ppruntime_requests_running"] == 0:
            break
        time.sleep(0.2)
    assert metrics["ppruntime_kv_blocks_used"] == 0, metrics
    assert metrics["ppruntime_generated_tokens_total"] < 64 * 12 + 400 + 200


def test_a_non_streamed_request_whose_client_left_is_aborted(pipeline_server):
    """Its tokens keep arriving, yet the handler notices the client has gone (a timeout)
    and aborts: far fewer than max_tokens are generated, and the blocks are freed."""
    tokens = "ppruntime_generated_tokens_total"
    before = pipeline_server.metrics()[tokens]
    body = {"prompt": "hi", "max_tokens": 2000, "ignore_eos": True, "temperature": 0}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{pipeline_server.url}/v1/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 60
    metrics = pipeline_server.metrics()
    while metrics["ppruntime_requests_running"] > 0 and time.monotonic() < deadline:
        time.sleep(0.2)
        metrics = pipeline_server.metrics()
    assert metrics["ppruntime_kv_blocks_used"] == 0, metrics
    assert metrics[tokens] - before < 2000, metrics  # all 2000: it ran on for no one


def test_bad_requests_are_400_naming_the_problem(pipeline_server):
    client = pipeline_server.client()
    cases = [
        ({"prompt": "hi", "top_p": 1.5}, "top_p"),
        ({"prompt": "hi", "temperature": "hot"}, "temperature"),
        ({"prompt": "hi", "presence_penalty": 0.5}, "presence_penalty"),
        ({"prompt": "hi", "frobnicate": 1}, "frobnicate"),
        ({"prompt": "x" * 3000, "max_tokens": 4}, "max_model_len"),
        ({"prompt": ""}, "prompt"),
    ]
    for body, named in cases:
        response = httpx.post(f"{pipeline_server.url}/v1/completions", json=body, timeout=30)
        assert response.status_code == 400, (body, response.text)
        assert named in response.json()["error"]["message"], (body, response.text)
    not_json = httpx.post(f"{pipeline_server.url}/v1/completions", content=b"\x80{", timeout=30)
    assert not_json.status_code == 400 and "not JSON" in not_json.text
    # the server goes on
    assert client.completions.create(model="tiny", prompt="hi", max_tokens=2).choices


def test_models_health_and_metrics(pipeline_server):
    models = pipeline_server.client().models.list()
    assert [model.id for model in models.data] == ["tiny"]
    assert httpx.get(f"{pipeline_server.url}/health", timeout=10).status_code == 200
    metrics = pipeline_server.metrics()
    for name in (
        "ppruntime_requests_running",
        "ppruntime_requests_waiting",
        "ppruntime_kv_blocks_used",
        "ppruntime_generation_tokens_per_second",
        'ppruntime_rank_busy_fraction{"rank": "0"}',
        "ppruntime_time_to_first_token_seconds_count",
        "ppruntime_inter_token_latency_seconds_count",
    ):
        assert name in metrics, sorted(metrics)
    assert metrics["ppruntime_time_to_first_token_seconds_count"] > 0


def test_every_rank_reports_its_busy_fraction(pipeline_server):
    """Rank 1's busy time reaches rank 0 (about once a second, off the hot path): after
    requests ran, its gauge appears, parses, and covers that work (> 0, <= 1)."""
    rank1_seconds = 'ppruntime_rank_busy_seconds_total{"rank": "1"}'
    before = pipeline_server.metrics().get(rank1_seconds, 0.0)
    client = pipeline_server.client()
    for prompt in PROMPTS:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    deadline = time.monotonic() + 30
    metrics = pipeline_server.metrics()
    while metrics.get(rank1_seconds, 0.0) <= before and time.monotonic() < deadline:
        time.sleep(0.25)  # the first report sent after the work
        metrics = pipeline_server.metrics()
    assert metrics.get(rank1_seconds, 0.0) > before, sorted(metrics)
    # the gauge moved with the counter, over an interval that holds the requests' forwards
    assert 0 < metrics['ppruntime_rank_busy_fraction{"rank": "1"}'] <= 1, metrics
    assert 0 <= metrics['ppruntime_rank_busy_fraction{"rank": "0"}'] <= 1, metrics
    assert not any('"rank": "2"' in name for name in metrics), sorted(metrics)


def test_every_rank_reports_its_counters(pipeline_server):
    """Each rank's counters (microbatches, sequences, tokens, CPU by span) reach /metrics.
    Between two reports of rank 1 taken while nothing ran, both ranks ran the same
    microbatches: equal counts, and the work of the requests in them."""

    def settled() -> dict[str, float]:
        """/metrics once nothing runs and rank 1 has reported since (about a second)."""
        when = 'ppruntime_rank_report_time_seconds{"rank": "1"}'
        deadline = time.monotonic() + 30
        metrics = pipeline_server.metrics()
        while metrics["ppruntime_requests_running"] and time.monotonic() < deadline:
            time.sleep(0.1)
            metrics = pipeline_server.metrics()
        idle_since = time.monotonic()
        while metrics.get(when, 0.0) <= idle_since and time.monotonic() < deadline:
            time.sleep(0.25)
            metrics = pipeline_server.metrics()
        assert metrics.get(when, 0.0) > idle_since, sorted(metrics)
        return metrics

    before = settled()
    client = pipeline_server.client()
    for prompt in PROMPTS:
        client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
    metrics = settled()

    def grew(name: str, rank: int, **labels: str) -> float:
        key = name + json.dumps({"rank": str(rank), **labels}, sort_keys=True)
        return metrics[key] - before.get(key, 0.0)

    for name in (
        "ppruntime_rank_microbatches_total",
        "ppruntime_rank_microbatch_sequences_total",
        "ppruntime_rank_decode_microbatches_total",
        "ppruntime_rank_tokens_computed_total",
    ):
        assert grew(name, 0) == grew(name, 1) > 0, name
    # every prompt token and every generated token but the last went through the stages
    assert grew("ppruntime_rank_tokens_computed_total", 1) >= len(PROMPTS) * 8
    assert grew("ppruntime_rank_decode_sequences_total", 1) >= len(PROMPTS) * 6
    cpu = "ppruntime_rank_cpu_seconds_total"
    for rank in (0, 1):
        assert grew(cpu, rank, part="forward") > 0, rank
        assert (
            metrics[cpu + json.dumps({"part": "thread", "rank": str(rank)})]
            <= (metrics[cpu + json.dumps({"part": "process", "rank": str(rank)})])
        )
    assert grew(cpu, 1, part="sample") > 0  # the last stage samples
    assert grew(cpu, 0, part="deltas-out") > 0  # rank 0's serving loop times its own part


def test_the_http_process_logs_where_the_ranks_do(chat_server):
    """--log-dir: the HTTP process writes DIR/http.log beside rank 0's file, at INFO there
    as the ranks do (uvicorn's start-up line), each line naming the process."""
    log = chat_server.log_dir / "http.log"
    assert log.exists(), sorted(p.name for p in chat_server.log_dir.iterdir())
    text = log.read_text()
    assert "INFO uvicorn.error: Uvicorn running on http://127.0.0.1:" in text, text
    assert all(line.startswith("[http of rank 0/1 ") for line in text.splitlines()), text
    assert (chat_server.log_dir / "rank-0.log").exists()


def test_chat_with_the_checkpoint_template(chat_server):
    client = chat_server.client()
    model = client.models.list().data[0].id
    messages = [{"role": "user", "content": "w3 w4"}]
    response = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=2
    )
    choice = response.choices[0]
    assert choice.message.role == "assistant"
    assert len(choice.logprobs.content) == response.usage.completion_tokens > 0
    assert all(len(entry.top_logprobs) == 2 for entry in choice.logprobs.content)
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=6, temperature=0, stream=True
    )
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert streamed == choice.message.content


def test_full_queue_answers_503_with_retry_after(chat_server):
    """One sequence runs, one may wait: of eight concurrent requests some get 503."""
    model = chat_server.client().models.list().data[0].id
    body = {"model": model, "prompt": "w3 w4", "max_tokens": 40, "temperature": 0}
    body["ignore_eos"] = True

    async def many():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(client.post(f"{chat_server.url}/v1/completions", json=body) for _ in range(8))
            )

    responses = asyncio.run(many())
    statuses = sorted(response.status_code for response in responses)
    assert 200 in statuses and 503 in statuses, statuses
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["Retry-After"] == "1"


def test_more_choices_than_the_server_holds_is_a_400_naming_n(chat_server):
    """One runs and one may wait: n=3 can never be admitted, so a 503 (retry later) would
    have the client retry for ever."""
    body = {"prompt": "w3 w4", "max_tokens": 2, "n": 3}
    response = httpx.post(f"{chat_server.url}/v1/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    assert "n=3" in response.json()["error"]["message"], response.text


def test_oversized_body_is_refused_before_parsing(chat_server):
    response = httpx.post(
        f"{chat_server.url}/v1/completions",
        content=b"{" + b" " * 4096 + b"}",
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 413, response.text


def _host_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def test_a_request_head_over_the_bound_is_refused_and_the_server_goes_on(chat_server):
    """A request line and headers that do not end (a client sending header after header)
    are refused once past the bound (16 KiB, h11's own) and the connection is closed, on
    httptools as on h11: httptools alone kept every header line until the head ended, a
    HTTP process growing without end (whose death stops the job)."""
    with socket.create_connection(_host_port(chat_server.url), timeout=30) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"x-pad: " + b"a" * 20000 + b"\r\n")
        answer = b""
        with contextlib.suppress(ConnectionResetError):  # closed with our bytes unread
            while chunk := sock.recv(65536):  # until the server closes (a timeout fails)
                answer += chunk
    status = answer.split(b"\r\n", 1)[0]
    assert answer == b"" or status in (
        b"HTTP/1.1 431 Request Header Fields Too Large",
        b"HTTP/1.1 400 Bad Request",  # h11's answer
    ), answer
    if status.endswith(b"431 Request Header Fields Too Large"):
        assert b"exceed 16384 bytes" in answer, answer
    # heads under the bound, one after another on a kept-alive connection: the bound is
    # a head's, not the connection's
    with httpx.Client(timeout=10) as client:
        for _ in range(3):
            response = client.get(f"{chat_server.url}/health", headers={"x-pad": "a" * 12000})
            assert response.status_code == 200, response.text


def test_preset_without_template_refuses_chat(pipeline_server):
    response = httpx.post(
        f"{pipeline_server.url}/v1/chat/completions",
        json={"messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert response.status_code == 400 and "no chat template" in response.text


def test_the_http_process_dying_ends_every_rank_naming_the_cause():
    server = Server(["--preset", "tiny", "--max-batch-size", "4"], ranks=2)
    try:
        body = {"prompt": "hello", "max_tokens": 400, "ignore_eos": True, "stream": True}
        with (
            httpx.Client(timeout=60) as client,
            client.stream("POST", f"{server.url}/v1/completions", json=body) as response,
        ):
            lines = response.iter_lines()
            assert next(lines).startswith("data: ")  # a request runs
            os.kill(server.http_pid, signal.SIGKILL)
            code = server.proc.wait(STOP_TIMEOUT_S)  # every rank ends, or this times out
    except BaseException:
        kill_job(server.proc)
        raise
    output = server.output()
    assert code != 0, output
    assert "the HTTP process exited (killed by SIGKILL" in output, output


def test_a_port_in_use_ends_the_job_naming_it_with_no_process_left():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = start_serve(["--preset", "tiny", "--port", str(port)])
        try:
            output, _ = proc.communicate(timeout=START_TIMEOUT_S)
        except BaseException:
            kill_job(proc)
            raise
    assert proc.returncode != 0, output
    assert f"could not listen on 127.0.0.1:{port}" in output, output
    assert _session_members(proc.pid) == [], output  # the HTTP process has gone too


def _nice(pid: int) -> int:
    with open(f"/proc/{pid}/stat") as stat:
        return int(stat.read().rsplit(")", 1)[1].split()[16])


def test_the_engine_process_dying_ends_the_http_process():
    server = Server(["--preset", "tiny"])
    assert not has_exited(server.http_pid)
    # the HTTP process runs below the engine's priority (--http-nice, default 10)
    assert _nice(server.http_pid) - _nice(server.proc.pid) == 10
    os.kill(server.proc.pid, signal.SIGKILL)  # no mpirun: this is rank 0 itself
    server.proc.wait(STOP_TIMEOUT_S)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    while not has_exited(server.http_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert has_exited(server.http_pid)


def test_sigterm_to_rank_0_lets_a_running_request_finish_and_ends_every_rank(
    pipeline_server, chat_server
):
    """Last in the module. SIGTERM to rank 0 (the pid the server prints; under mpirun the
    signal must go there: Open MPI kills the ranks ~0.5 s after mpirun forwards one) gets
    the grace period: a request running then streams to its end, and every rank exits 0."""
    body = {"prompt": "hello", "max_tokens": 400, "temperature": 0, "stream": True}
    body |= {"ignore_eos": True, "stream_options": {"include_usage": True}}
    events: list[dict] = []
    first = threading.Event()

    def stream() -> None:
        with httpx.stream(
            "POST", f"{pipeline_server.url}/v1/completions", json=body, timeout=60
        ) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    events.append(json.loads(line[6:]))
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(30), pipeline_server.output()
    signalled_at = len(events)
    os.kill(pipeline_server.rank_zero_pid, signal.SIGTERM)
    reader.join(60)
    assert pipeline_server.proc.wait(STOP_TIMEOUT_S) == 0, pipeline_server.output()
    finish = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
    assert finish == ["length"], (finish, pipeline_server.output())
    assert events[-1]["usage"]["completion_tokens"] == 400
    assert signalled_at < len(events) - 1  # it was still running when the signal came
    assert "ppruntime serve: stopped" in pipeline_server.output()
    # (Open MPI forwards no output after mpirun got SIGTERM; the lone server prints)
    assert chat_server.stop() == 0
    assert "ppruntime serve: stopped" in chat_server.output()

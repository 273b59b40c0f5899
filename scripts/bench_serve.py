#!/usr/bin/env python
"""Serving benchmark (issue 17): N concurrent streaming clients against `ppruntime serve`,
beside the same prompts through offline `LLM.generate`, in one run.

    python scripts/bench_serve.py --json                       # tiny, PP=2, 64 streams
    python scripts/bench_serve.py --preset bench-small --clients 16 --json
    python scripts/bench_serve.py --h200 --json    # the issue's H200 numbers, ~1-3 min
    python scripts/bench_serve.py --h200 --shape small --device cpu --json  # its flow, CPU

The driver writes the random checkpoint once (`--shape`, bench_gpu.py's shapes), starts
the offline job (`mpirun -n PP python this --worker`, warmed up, then waiting) and one
server (`mpirun -n PP ppruntime serve --port 0`, ready when it prints its address, warmed
up by an untimed round), and runs `--rounds` rounds in which the two take turns (the
order alternating): the `--requests` prompts through `LLM.generate` (all in one call, the
issue's offline figure, and again `--clients` at a time: offline at the streams'
concurrency), then the same prompts through `--clients` streams. The job whose turn it is
not is frozen (SIGSTOP), so neither polls while the other is timed, and each round's pair
sees the same load of the shared machine; the headline ratio is the median of the rounds'.
With `--ttft-clients N` a last phase of N streams measures the time to first token.
Every phase is bounded (`--time-limit`: what finished by then is reported, with
`timed_out`). Reported: output tokens/s of both paths, the ratio (and each round's), the
offline clients-at-a-time / all-at-once ratio and serve against that, TTFT and
inter-token (inter-chunk) latency percentiles, tokens a streamed chunk (> 1 when the
server's HTTP process is behind the engine and takes several steps' tokens at once), the
server job's CPU a token (every process of the job: the ranks and the HTTP process), the
same by process (`cpu_us_per_token`: "http", "rank N", "other" for mpirun, and "client"
for the benchmark's client processes) and offline's (`offline_cpu_us_per_token`): CPU
seconds from /proc and the clients' own process time, which a loaded machine slows but
hardly moves, so two versions of the streaming path can be compared there; the load
average, and where the wall time went. Per rank and path (`rank_counters`, `--no-rank-counters`
to skip; scripts/_rank_counters.py): iterations, microbatches and their sequences, poll
sleeps, context switches and CPU a token by span, from every rank's counters as reported to
rank 0 (a snapshot after each phase, once every rank has reported after it: up to ~2 s,
untimed). `--variant-flags`, `--variant-tree DIR`, `--variant-env NAME=VALUE`: a second
server (other flags, another checkout's ppruntime, other environment) whose rounds take
turns with the first's: an A/B in one run (`variant`: its figures, its ratio to the first
server round by round).

The streams are read by `_sse_client.py` (`--client lean`, default): an asyncio HTTP/1.1
+ server-sent-events reader that checks every stream ends with `[DONE]` after its finish
reason and counts the tokens from the usage chunk. Real clients run on other machines;
these run on the server's cores, so the less CPU they cost, the less they take from the
server (httpx with a `json.loads` a chunk, `--client httpx`, costs 5-10x more here). They
are spread over `--client-processes` spawned processes (a quarter of the cores by default).

`--h200` is the issue's H200 measurement in one invocation: the 1B shape at PP=1, 128
requests of 128 + 128 tokens at 64 streams beside offline, then 64 requests at 16
streams for TTFT (target: serve / offline >= 0.8, TTFT p50 < 100 ms).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common
import _rank_counters as rank_counters

BLOCK_SIZE = 16
WARMUP_TOKENS = 4
READY_LINE = "BENCH_OFFLINE_READY"
ROUND_PREFIX = "BENCH_ROUND "
CLIENT_START_S = 3.0  # client processes start this long after they are spawned
H200 = {  # --h200: values for the options left at None
    "shape": "1b",
    "pp": 1,
    "clients": 64,
    "requests": 128,
    "ttft_clients": 16,
    "ttft_requests": 64,
    "input_len": 128,
    "output_len": 128,
    "max_num_tokens": 2048,
    "time_limit": 60.0,
    "rounds": 3,
}
DEFAULTS = {
    "pp": 2,
    "clients": 64,
    "ttft_clients": 0,
    "input_len": 32,
    "output_len": 64,
    "time_limit": 300.0,
    "rounds": 5,
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default=None, help="a checkpoint directory instead")
    parser.add_argument(
        "--shape",
        default=None,
        help="write a random bf16 checkpoint of this bench_gpu.py shape (1b, 8b, small) once "
        "and serve it",
    )
    parser.add_argument("--workdir", default=None, help="where --shape writes (a temp dir)")
    parser.add_argument("--h200", action="store_true", help="the issue's H200 measurement")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: the engine's)")
    parser.add_argument("--pp", type=int, default=None, help="default 2 (--h200: 1)")
    parser.add_argument("--clients", type=int, default=None, help="concurrent streams (64)")
    parser.add_argument(
        "--requests", type=int, default=None, help="a round's requests (default: 2 x clients)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of the requests through each path, taking turns (default 5; --h200: 3); "
        "the ratio is the median of the rounds'",
    )
    parser.add_argument("--rounds-fifo", default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--ttft-clients",
        type=int,
        default=None,
        help="then a phase of this many streams for TTFT (default none; --h200: 16)",
    )
    parser.add_argument("--ttft-requests", type=int, default=None, help="default: 4 x those")
    parser.add_argument("--input-len", type=int, default=None, help="default 32 (--h200: 128)")
    parser.add_argument("--output-len", type=int, default=None, help="default 64 (--h200: 128)")
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument(
        "--http-nice", type=int, default=None, help="the server's --http-nice (its default)"
    )
    parser.add_argument("--max-num-tokens", type=int, default=None, help="the engine's default")
    parser.add_argument(
        "--warmup",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"an untimed round of --clients requests of {WARMUP_TOKENS} tokens on each path",
    )
    parser.add_argument(
        "--time-limit", type=float, default=None, help="seconds per client phase (300; --h200 60)"
    )
    parser.add_argument(
        "--client-processes",
        type=int,
        default=max(1, min(8, (os.cpu_count() or 1) // 4)),
        help="processes the streams are spread over (default: a quarter of the cores, <= 8)",
    )
    parser.add_argument(
        "--client",
        choices=("lean", "httpx"),
        default="lean",
        help="lean: the asyncio HTTP/1.1 + SSE reader of _sse_client.py (the clients share "
        "the server's cores: the cheaper they are, the less they take from it); httpx: "
        "httpx with a json.loads a chunk, as a typical Python client",
    )
    parser.add_argument(
        "--rank-counters",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each rank's counters over each path's phases, side by side (iterations, "
        "microbatches, sequences a decode microbatch, CPU by span): a snapshot after each "
        "phase, taken once every rank has reported after it (up to ~2 s a phase, untimed)",
    )
    parser.add_argument(
        "--variant-flags",
        default=None,
        help="A/B: a second server with these extra `ppruntime serve` flags (one string, "
        "e.g. '--http-nice 0'), its rounds taking turns with the others'",
    )
    parser.add_argument(
        "--variant-tree",
        default=None,
        help="A/B: a second server run from this checkout's ppruntime (a directory holding "
        "ppruntime/, e.g. a `git worktree` of the code before a change)",
    )
    parser.add_argument(
        "--variant-env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="A/B: a second server with this environment variable set (repeatable), e.g. "
        "PPRUNTIME_POLL_MAX_US=200",
    )
    parser.add_argument("--start-timeout", type=float, default=180.0, help="seconds per job start")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the options left at None: from --h200, then the defaults."""
    chosen = {**DEFAULTS, **(H200 if args.h200 else {})}
    for name, value in chosen.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.requests is None:
        args.requests = 2 * args.clients
    if args.ttft_requests is None:
        args.ttft_requests = 4 * args.ttft_clients
    if args.shape and args.model:
        raise SystemExit("bench_serve: give --shape or --model, not both")
    return args


def _prompts(count: int, input_len: int, seed: int) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=input_len).tolist() for _ in range(count)]


def throughput_prompts(args) -> list[list[int]]:
    return _prompts(args.requests, args.input_len, 0)


def engine_options(args: argparse.Namespace) -> dict:
    """Engine settings both paths get. A checkpoint's max_position_embeddings (131072 for
    the 1B shape) would size every slot's block table and the graphs' context, and need
    more KV blocks than the default budget: the lengths run here bound them."""
    options = {"max_batch_size": args.max_batch_size}
    if args.max_num_tokens is not None:
        options["max_num_tokens"] = args.max_num_tokens
    if args.device is not None:
        options["device"] = args.device
    if args.model is not None:
        seq_len = args.input_len + args.output_len
        options["max_model_len"] = seq_len + BLOCK_SIZE
        options["kv_cache_blocks"] = args.max_batch_size * math.ceil(seq_len / BLOCK_SIZE) + 8
    return options


def _as_flags(options: dict) -> list[str]:
    flags = []
    for name, value in options.items():
        flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def _model_flags(args) -> list[str]:
    return ["--model", args.model] if args.model else ["--preset", args.preset]


def worker(args: argparse.Namespace) -> None:
    """Offline: the same prompts through LLM.generate under mpirun (warmed up first),
    once per line the driver writes to the `--rounds-fifo` FIFO, until it closes it."""
    common.one_torch_thread()
    from ppruntime import LLM, SamplingParams

    args = resolve(args)
    started = time.perf_counter()
    llm = LLM(
        args.model,
        preset=None if args.model else args.preset,
        pp_size=args.pp,
        **engine_options(args),
    )
    startup_s = time.perf_counter() - started
    prompts = throughput_prompts(args)
    warmup_s = 0.0
    if args.warmup:
        began = time.perf_counter()
        warmup = SamplingParams(max_tokens=WARMUP_TOKENS, temperature=0, ignore_eos=True)
        llm.generate(prompts[: args.clients], warmup, use_tqdm=False)
        warmup_s = time.perf_counter() - began
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    snapshot = None
    if args.rank_counters:
        snapshot = rank_counters.offline_snapshot(llm, time.monotonic(), args.pp)
    print(READY_LINE, flush=True)
    with open(args.rounds_fifo) as rounds:
        for _ in rounds:
            result = {}
            # all the prompts in one call (the offline figure), then the same prompts
            # `clients` at a time: offline at the streams' concurrency (at PP=2 one call
            # runs 2 x max_batch_size sequences at once, the streams only `clients`)
            for name, group in (("", len(prompts)), ("matched_", args.clients)):
                start = time.perf_counter()
                tokens = 0
                for first in range(0, len(prompts), group):
                    chunk = prompts[first : first + group]
                    outputs = llm.generate(chunk, params, use_tqdm=False)
                    tokens += sum(len(o.token_ids) for o in outputs)
                result[name + "output_tokens"] = tokens
                result[name + "window_s"] = time.perf_counter() - start
                if snapshot is not None:  # untimed: after the window
                    now = rank_counters.offline_snapshot(llm, time.monotonic(), args.pp)
                    result[name + "ranks"] = rank_counters.difference(snapshot, now)
                    snapshot = now
            print(ROUND_PREFIX + json.dumps(result), flush=True)
    llm.shutdown()
    common.emit_worker_result({"startup_s": startup_s, "warmup_s": warmup_s})


def _signal_job(session: int, signum: int) -> None:
    """Signal every process of an MPI job started with start_new_session (mpirun puts
    each rank in its own process group, so killpg would reach mpirun alone)."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.getsid(int(entry)) == session:
                os.kill(int(entry), signum)


@contextlib.contextmanager
def _running(job) -> object:
    """Let `job` (frozen with SIGSTOP between its turns) run for the block.

    The offline job and the server stay up for the whole measurement and take turns,
    round by round, so that each round's pair sees the same machine load (other
    processes share these cores; the load changes from second to second). The job
    whose turn it is not is stopped, not idle: an idle job still polls (an idle
    server takes ~7 % of a core here), which would slow the other one."""
    _signal_job(job.proc.pid, signal.SIGCONT)
    try:
        yield job
    finally:
        _signal_job(job.proc.pid, signal.SIGSTOP)


def _start_job(
    pp: int, command: list[str], tree: str | None = None, env_vars: list[str] = ()
) -> subprocess.Popen:
    """`mpirun -n pp command` in a session of its own (freezing and stopping reach every
    process of it), stdout and stderr read as one stream; `tree`: import ppruntime from
    that directory instead of this checkout; `env_vars`: NAME=VALUE for every rank."""
    env = common.worker_env(dict(item.split("=", 1) for item in env_vars))
    cwd = None
    if tree is not None:
        # `python -m` puts the working directory first on sys.path: run from the tree
        cwd = os.path.abspath(tree)
        env["PYTHONPATH"] = cwd + os.pathsep + env["PYTHONPATH"]
        _check_tree(cwd, env)
    return subprocess.Popen(
        common.mpi_command(pp, command),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        cwd=cwd,
        start_new_session=True,
    )


def _check_tree(tree: str, env: dict) -> None:
    """--variant-tree: that tree's ppruntime is the one its server will import."""
    found = subprocess.run(
        [sys.executable, "-c", "import ppruntime; print(ppruntime.__file__)"],
        capture_output=True,
        text=True,
        env=env,
        cwd=tree,
        check=True,
    ).stdout.strip()
    if not found.startswith(os.path.join(tree, "ppruntime")):
        raise SystemExit(f"bench_serve: --variant-tree {tree} would import ppruntime from {found}")


def _job_cpu_seconds(session: int, named: dict, parts: dict[int, str]) -> dict | None:
    """CPU time so far of every process of the MPI job whose session is `session`, by
    part: a name from `named` (pid -> name: the HTTP process), "rank N"
    (OMPI_COMM_WORLD_RANK), "other" (mpirun's own); `parts` caches each pid's. None off
    Linux. User + system time from /proc/PID/stat: what a process cost, however long it
    waited for a core on a loaded machine."""
    if not os.path.isdir("/proc/self/task"):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    seconds: dict[str, float] = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) != session:  # not the job's (started with start_new_session)
            continue
        if int(pid) not in parts:
            parts[int(pid)] = named.get(int(pid)) or _rank_of(int(pid))
        part = parts[int(pid)]
        seconds[part] = seconds.get(part, 0.0) + (int(fields[11]) + int(fields[12])) / ticks
    return seconds


def _rank_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            variables = environ.read().split(b"\0")
    except OSError:
        return "other"
    rank = [v.split(b"=", 1)[1] for v in variables if v.startswith(b"OMPI_COMM_WORLD_RANK=")]
    return f"rank {int(rank[0])}" if rank else "other"


def _cpu_spent(before: dict | None, after: dict | None) -> dict | None:
    if before is None or after is None:
        return None
    return {part: seconds - before.get(part, 0.0) for part, seconds in after.items()}


class _OfflineJob:
    """The offline worker under mpirun: a round of `LLM.generate` per `run_round()`."""

    def __init__(self, args, worker_args: list[str], fifo: str) -> None:
        command = [sys.executable, os.path.abspath(__file__), "--worker", *worker_args]
        command += ["--rounds-fifo", fifo]
        self.proc = _start_job(args.pp, command)
        self._parts: dict[int, str] = {}  # pid -> its part in _job_cpu_seconds
        self.output: list[str] = []
        self.lines: queue.SimpleQueue = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()
        self._expect(READY_LINE, args.start_timeout)
        self._fifo_path = fifo
        self._fifo = None

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def _expect(self, prefix: str, timeout_s: float) -> str:
        deadline = time.perf_counter() + timeout_s
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.perf_counter(), 0.01))
            except queue.Empty:
                line = None
            if line is None:
                self.kill()
                raise RuntimeError(
                    f"the offline job printed no {prefix.strip()!r} line (rc="
                    f"{self.proc.poll()}):\n" + "".join(self.output[-40:])
                )
            if line.startswith(prefix):
                return line[len(prefix) :]

    def _open_fifo(self, timeout_s: float) -> None:
        """The FIFO's write end, once the worker has opened its read end (a plain open
        would wait forever for a worker that died)."""
        deadline = time.perf_counter() + timeout_s
        while self._fifo is None:
            try:
                fd = os.open(self._fifo_path, os.O_WRONLY | os.O_NONBLOCK)
            except OSError as error:  # ENXIO: no reader yet
                if self.proc.poll() is not None or time.perf_counter() > deadline:
                    self.kill()
                    raise RuntimeError(
                        f"the offline job did not take its rounds ({error}, rc="
                        f"{self.proc.poll()}):\n" + "".join(self.output[-40:])
                    ) from None
                time.sleep(0.05)
                continue
            os.set_blocking(fd, True)
            self._fifo = os.fdopen(fd, "w")

    def run_round(self, timeout_s: float) -> dict:
        """A round's figures, with the job's CPU seconds by process ("cpu_s")."""
        self._open_fifo(timeout_s)
        cpu_before = _job_cpu_seconds(self.proc.pid, {}, self._parts)
        self._fifo.write("round\n")
        self._fifo.flush()
        result = json.loads(self._expect(ROUND_PREFIX, timeout_s))
        result["cpu_s"] = _cpu_spent(cpu_before, _job_cpu_seconds(self.proc.pid, {}, self._parts))
        return result

    def finish(self, timeout_s: float) -> dict:
        """End the rounds; the worker's result (start-up and warm-up seconds)."""
        self._open_fifo(timeout_s)
        self._fifo.close()
        result = json.loads(self._expect(common.RESULT_PREFIX, timeout_s))
        self.proc.wait(timeout_s)
        return result

    def kill(self) -> None:
        _signal_job(self.proc.pid, signal.SIGCONT)
        _signal_job(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)


class _Server:
    """One `ppruntime serve` job; ready when it prints the address it listens on."""

    def __init__(
        self, args, extra_flags: list[str] = (), tree: str | None = None, env_vars: list[str] = ()
    ) -> None:
        serve = [sys.executable, "-m", "ppruntime", "serve", *_model_flags(args)]
        serve += ["--port", "0", "--max-waiting", "100000", "--shutdown-grace", "5"]
        serve += _as_flags(engine_options(args))
        if args.http_nice is not None:
            serve += ["--http-nice", str(args.http_nice)]
        serve += list(extra_flags)
        # mpirun's environment reaches its ranks on this host
        self.proc = _start_job(args.pp, serve, tree, env_vars)
        self.url = None
        self.http_pid: int | None = None
        self._parts: dict[int, str] = {}  # pid -> its part in cpu_seconds()
        self.ready = threading.Event()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        started = time.perf_counter()
        while not self.ready.wait(0.1):
            if self.proc.poll() is not None or time.perf_counter() - started > args.start_timeout:
                self.stop()
                raise RuntimeError(
                    f"the server did not start (rc={self.proc.returncode}):\n"
                    + "".join(self.output[-40:])
                )
        self.start_s = time.perf_counter() - started

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].split()[0]
                pid = re.search(r"HTTP process pid (\d+)", line)
                self.http_pid = int(pid.group(1)) if pid else None
                self.ready.set()

    def cpu_seconds(self) -> dict[str, float] | None:
        """CPU seconds so far of every process of the job, by part (`_job_cpu_seconds`)."""
        return _job_cpu_seconds(self.proc.pid, {self.http_pid: "http"}, self._parts)

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def _one_stream(client, url: str, prompt: list[int], max_tokens: int, record: list) -> None:
    """--client httpx: one streamed request, every chunk parsed as JSON."""
    from _sse_client import stream_request

    body = stream_request(prompt, max_tokens)
    start = time.perf_counter()
    arrivals = []
    tokens = None
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"] is not None:
                    arrivals.append(time.perf_counter())
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
    record.append((start, arrivals, tokens))


async def _lean_streams(url: str, prompts: list, clients: int, max_tokens: int, record: list):
    """--client lean (default): the clients' loops on scripts/_sse_client.py."""
    from _sse_client import StreamingClient

    client = StreamingClient(url)
    requests = [client.body(prompt, max_tokens) for prompt in reversed(prompts)]

    async def loop() -> None:
        while requests:
            result = await client.stream(requests.pop())
            record.append((result.start, result.arrivals, result.completion_tokens))

    return client, [asyncio.ensure_future(loop()) for _ in range(clients)]


async def _clients(
    url: str,
    prompts: list,
    clients: int,
    max_tokens: int,
    time_limit: float,
    start_at: float | None = None,
    kind: str = "lean",
) -> tuple[list, float, bool]:
    """`clients` streams take the prompts one after another (from `start_at`, a
    perf_counter time, when given); what finished within `time_limit`, the window, and
    whether the limit cut it short."""
    if start_at is not None:
        await asyncio.sleep(max(start_at - time.perf_counter(), 0.0))

    record: list = []
    if kind == "lean":
        start = time.perf_counter()
        client, tasks = await _lean_streams(url, prompts, clients, max_tokens, record)
        return await _finish(tasks, start, time_limit, record, client.close)
    import httpx

    queue = list(reversed(prompts))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=time_limit, limits=limits) as client:

        async def loop() -> None:
            while queue:
                await _one_stream(client, url, queue.pop(), max_tokens, record)

        start = time.perf_counter()
        tasks = [asyncio.ensure_future(loop()) for _ in range(clients)]
        return await _finish(tasks, start, time_limit, record)


async def _finish(tasks, start: float, time_limit: float, record: list, close=None) -> tuple:
    done, pending = await asyncio.wait(tasks, timeout=time_limit)
    window = time.perf_counter() - start
    for task in pending:
        task.cancel()
    await asyncio.gather(*pending, return_exceptions=True)
    if close is not None:
        close()
    for task in done:
        task.result()  # a failed request fails the benchmark
    return record, window, bool(pending)


def _event_loop(kind: str):
    """How a client process runs its streams: the lean clients on uvloop when installed."""
    if kind != "lean":
        return asyncio.run
    from _sse_client import run

    return run


def _client_group(url, prompts, clients, max_tokens, time_limit, start_at, kind) -> tuple:
    """One client process's share of a phase (runs in a spawned process), and the CPU
    seconds it took (this process, all its threads: user + system)."""
    cpu_before = time.process_time()
    record, window, timed_out = _event_loop(kind)(
        _clients(url, prompts, clients, max_tokens, time_limit, start_at, kind)
    )
    return record, start_at + window, timed_out, time.process_time() - cpu_before


def _run_clients(url: str, prompts: list, clients: int, max_tokens: int, args) -> tuple:
    """The phase's streams in `--client-processes` processes (one Python process parsing
    every chunk of 64 streams caps what it can measure), started together."""
    processes = max(1, min(args.client_processes, clients))
    if processes == 1:
        cpu_before = time.process_time()
        record, window, timed_out = _event_loop(args.client)(
            _clients(url, prompts, clients, max_tokens, args.time_limit, kind=args.client)
        )
        return record, window, timed_out, time.process_time() - cpu_before
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # perf_counter is CLOCK_MONOTONIC on Linux: the same clock in every process
    start_at = time.perf_counter() + CLIENT_START_S
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [
            pool.submit(
                _client_group,
                url,
                prompts[index::processes],
                clients // processes + (index < clients % processes),
                max_tokens,
                args.time_limit,
                start_at,
                args.client,
            )
            for index in range(processes)
        ]
        groups = [future.result() for future in futures]
    record = [entry for group in groups for entry in group[0]]
    window = max(group[1] for group in groups) - start_at
    client_cpu = sum(group[3] for group in groups)
    return record, window, any(group[2] for group in groups), client_cpu


def _phase_part(server: _Server, prompts: list, clients: int, max_tokens: int, args) -> dict:
    """One run of the clients over `prompts`: what it recorded, its window, its CPU."""
    cpu_before = server.cpu_seconds()
    record, window, timed_out, client_cpu = _run_clients(
        server.url, prompts, clients, max_tokens, args
    )
    cpu_after = server.cpu_seconds()
    # every finished stream's usage chunk; ignore_eos: each must carry all max_tokens
    counts = [count for _, _, count in record]
    if any(count != max_tokens for count in counts):
        raise RuntimeError(f"streams reported {sorted(set(counts))} tokens, not {max_tokens}")
    cpu_by_part = _cpu_spent(cpu_before, cpu_after)
    return {
        "record": record,
        "window_s": window,
        "timed_out": timed_out,
        "tokens": sum(counts),
        "server_cpu_s": sum(cpu_by_part.values()) if cpu_by_part is not None else None,
        "server_cpu_by_part_s": cpu_by_part,
        "client_cpu_s": client_cpu,
    }


def _summary(parts: list[dict], clients: int, args) -> dict:
    """A phase's figures over its parts (the rounds of the throughput phase)."""
    record = [entry for part in parts for entry in part["record"]]
    window = sum(part["window_s"] for part in parts)
    tokens = sum(part["tokens"] for part in parts)
    ttft = [arrivals[0] - start for start, arrivals, _ in record if arrivals]
    itl = [b - a for _, arrivals, _ in record for a, b in zip(arrivals, arrivals[1:])]
    chunks = sum(len(arrivals) for _, arrivals, _ in record)
    cpu = [part["server_cpu_s"] for part in parts]
    per_token_us: dict[str, float] | None = None  # CPU a token, by process
    if tokens and None not in cpu:
        totals: dict[str, float] = {}
        for part in parts:
            for name, seconds in part["server_cpu_by_part_s"].items():
                totals[name] = totals.get(name, 0.0) + seconds
        totals["client"] = sum(part["client_cpu_s"] for part in parts)
        per_token_us = {name: totals[name] / tokens * 1e6 for name in sorted(totals)}
    return {
        "clients": clients,
        "client_processes": max(1, min(args.client_processes, clients)),
        "requests": len(record),
        "timed_out": any(part["timed_out"] for part in parts),
        "window_s": window,
        "output_tokens_per_s": tokens / window,
        "ttft_p50_s": common.percentile(ttft, 50),
        "ttft_p99_s": common.percentile(ttft, 99),
        "itl_p50_s": common.percentile(itl, 50),
        "itl_p99_s": common.percentile(itl, 99),
        # > 1 when the HTTP process took several steps' tokens at once; ITL is per chunk
        "tokens_per_chunk": tokens / chunks if chunks else None,
        # every rank's process, whole job
        "server_cpu_s_per_token": sum(cpu) / tokens if tokens and None not in cpu else None,
        # the same in microseconds (the JSON rounds to 4 digits)
        "server_cpu_us_per_token": sum(cpu) / tokens * 1e6 if tokens and None not in cpu else None,
        # by process: "http", "rank N", "other" (mpirun), and "client" (the benchmark's
        # client processes, all together): CPU seconds, not wall time, so a loaded
        # machine slows them but hardly moves these
        "cpu_us_per_token": per_token_us,
    }


def _phase(server: _Server, prompts: list, clients: int, max_tokens: int, args) -> dict:
    return _summary([_phase_part(server, prompts, clients, max_tokens, args)], clients, args)


def _write_shape(args, seconds: dict) -> tempfile.TemporaryDirectory | None:
    """--shape: the random checkpoint, written once; args.model then names it."""
    if not args.shape:
        return None
    import torch
    from bench_gpu import SHAPES, write_checkpoint

    if args.shape not in SHAPES:
        raise SystemExit(f"bench_serve: --shape must be one of {sorted(SHAPES)}, got {args.shape}")
    temporary = None
    if args.workdir is None:
        temporary = tempfile.TemporaryDirectory(prefix="bench_serve_")
        workdir = Path(temporary.name)
    else:
        workdir = Path(args.workdir)
    began = time.perf_counter()
    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    args.model = str(write_checkpoint(SHAPES[args.shape], workdir / args.shape, device))
    if device.type == "cuda":
        torch.cuda.empty_cache()
    seconds["checkpoint_write"] = time.perf_counter() - began
    return temporary


def check_imports(client: str) -> None:
    """The server (same interpreter) and the clients need these: say so before the
    checkpoint and the offline run, not after (a server that cannot start exits at once)."""
    import importlib.util

    needed = ["fastapi", "uvicorn", "prometheus_client", "jinja2"]
    if client == "httpx":
        needed.append("httpx")
    missing = [name for name in needed if importlib.util.find_spec(name) is None]
    if missing:
        raise SystemExit(
            f"bench_serve: {', '.join(missing)} missing for {sys.executable}: pip install "
            "'ppruntime[serve]' (--client httpx: and httpx; offline: pip install --no-index "
            "--find-links DIR ...)"
        )


def drive(args: argparse.Namespace) -> int:
    began = time.perf_counter()
    args = resolve(args)
    check_imports(args.client)
    seconds: dict[str, float] = {}
    temporary = _write_shape(args, seconds)
    try:
        result = _measure(args, seconds)
    finally:
        if temporary is not None:
            temporary.cleanup()
    seconds["total"] = time.perf_counter() - began
    result["seconds"] = seconds
    common.emit(_table(args, result), result, args.json)
    return 0


def _worker_args(args) -> list[str]:
    worker_args = [*_model_flags(args), "--pp", str(args.pp), "--clients", str(args.clients)]
    worker_args += ["--requests", str(args.requests), "--input-len", str(args.input_len)]
    worker_args += ["--output-len", str(args.output_len)]
    worker_args += ["--max-batch-size", str(args.max_batch_size)]
    if args.max_num_tokens is not None:
        worker_args += ["--max-num-tokens", str(args.max_num_tokens)]
    if args.device is not None:
        worker_args += ["--device", args.device]
    if not args.warmup:
        worker_args.append("--no-warmup")
    if not args.rank_counters:
        worker_args.append("--no-rank-counters")
    return worker_args


def _seconds_name(server: str) -> str:
    return "server" if server == "serve" else server


def _measure(args, seconds: dict) -> dict:
    """Both jobs up at once, taking turns: a round is the prompts through offline
    `LLM.generate`, then through the server (the order alternates round by round, so a
    load that rises or falls during the run does not favour one path)."""
    load_before = os.getloadavg()
    fifo_dir = tempfile.TemporaryDirectory(prefix="bench_serve_rounds_")
    fifo = os.path.join(fifo_dir.name, "rounds")
    os.mkfifo(fifo)
    began = time.perf_counter()
    offline = _OfflineJob(args, _worker_args(args), fifo)
    seconds["offline_start"] = time.perf_counter() - began
    _signal_job(offline.proc.pid, signal.SIGSTOP)
    servers: dict[str, _Server] = {}
    try:
        server = servers["serve"] = _Server(args)
        seconds["server_start"] = server.start_s
        if args.variant_flags is not None or args.variant_tree is not None or args.variant_env:
            flags = shlex.split(args.variant_flags or "")
            servers["variant"] = _Server(args, flags, args.variant_tree, args.variant_env)
            seconds["variant_start"] = servers["variant"].start_s
        prompts = throughput_prompts(args)
        snapshots: dict[str, dict | None] = {}
        for name, job in servers.items():
            if args.warmup:
                began = time.perf_counter()
                _phase(job, prompts[: args.clients], args.clients, WARMUP_TOKENS, args)
                seconds[f"{_seconds_name(name)}_warmup"] = time.perf_counter() - began
            snapshots[name] = None
            if args.rank_counters:
                snapshots[name] = rank_counters.server_snapshot(job.url, time.monotonic(), args.pp)
            _signal_job(job.proc.pid, signal.SIGSTOP)
        offline_rounds: list[dict] = []
        rounds: dict[str, list[dict]] = {name: [] for name in servers}
        serve_rounds = rounds["serve"]
        round_timeout = args.start_timeout + 2 * args.time_limit
        began = time.perf_counter()
        participants = ["offline", *servers]
        for index in range(args.rounds):
            # each round a different one first (two: the order alternates)
            shift = index % len(participants)
            for turn in participants[shift:] + participants[:shift]:
                if turn == "offline":
                    with _running(offline):
                        offline_rounds.append(offline.run_round(round_timeout))
                    continue
                job = servers[turn]
                with _running(job):
                    part = _phase_part(job, prompts, args.clients, args.output_len, args)
                    if snapshots[turn] is not None:  # untimed: after the window
                        now = rank_counters.server_snapshot(job.url, time.monotonic(), args.pp)
                        part["ranks"] = rank_counters.difference(snapshots[turn], now)
                        snapshots[turn] = now
                    rounds[turn].append(part)
            if any(parts[-1]["timed_out"] for parts in rounds.values()):
                break  # a server that cannot finish a round in the limit: report that
        seconds["rounds"] = time.perf_counter() - began
        for job in servers.values():
            _signal_job(job.proc.pid, signal.SIGCONT)
        _signal_job(offline.proc.pid, signal.SIGCONT)
        offline_result = offline.finish(args.start_timeout)
        seconds["offline_startup"] = offline_result["startup_s"]
        throughput = _summary(serve_rounds, args.clients, args)
        ttft = None
        if args.ttft_clients:
            ttft_prompts = _prompts(args.ttft_requests, args.input_len, 1)
            ttft = _phase(server, ttft_prompts, args.ttft_clients, args.output_len, args)
            seconds["ttft_phase"] = ttft["window_s"]
    finally:
        if offline.proc.poll() is None and "offline_startup" not in seconds:
            offline.kill()
        for name, job in servers.items():
            _signal_job(job.proc.pid, signal.SIGCONT)
            began = time.perf_counter()
            job.stop()
            seconds[f"{_seconds_name(name)}_stop"] = time.perf_counter() - began
        fifo_dir.cleanup()
    offline_tokens = sum(r["output_tokens"] for r in offline_rounds[: len(serve_rounds)])
    offline_window = sum(r["window_s"] for r in offline_rounds[: len(serve_rounds)])
    offline_tput = offline_tokens / offline_window
    ratios = [
        (part["tokens"] / part["window_s"]) / (off["output_tokens"] / off["window_s"])
        for part, off in zip(serve_rounds, offline_rounds)
    ]
    matched = [
        (part["tokens"] / part["window_s"])
        / (off["matched_output_tokens"] / off["matched_window_s"])
        for part, off in zip(serve_rounds, offline_rounds)
    ]
    concurrency = [
        (off["matched_output_tokens"] / off["matched_window_s"])
        / (off["output_tokens"] / off["window_s"])
        for off in offline_rounds
    ]
    result = {
        "model": args.shape or args.model or args.preset,
        "pp": args.pp,
        "input_len": args.input_len,
        "output_len": args.output_len,
        "clients": args.clients,
        "client": args.client,
        "rounds": len(serve_rounds),
        "requests": throughput["requests"],
        "timed_out": throughput["timed_out"],
        "serve_output_tokens_per_s": throughput["output_tokens_per_s"],
        "offline_output_tokens_per_s": offline_tput,
        # the median of the rounds' ratios (each a pair run back to back)
        "serve_over_offline": common.percentile(ratios, 50),
        "serve_over_offline_rounds": ratios,
        "serve_over_offline_total": throughput["output_tokens_per_s"] / offline_tput,
        "offline_tokens_per_s_rounds": [r["output_tokens"] / r["window_s"] for r in offline_rounds],
        # offline `clients` prompts at a time against all at once (what the concurrency
        # alone costs), and serve against that: the ratio is their product, round by round
        "offline_matched_over_offline": common.percentile(concurrency, 50),
        "serve_over_offline_matched": common.percentile(matched, 50),
        "load_average": [load_before[0], os.getloadavg()[0]],
        **{
            key: throughput[key]
            for key in (
                "ttft_p50_s",
                "ttft_p99_s",
                "itl_p50_s",
                "itl_p99_s",
                "tokens_per_chunk",
                "server_cpu_s_per_token",
                "server_cpu_us_per_token",
                "cpu_us_per_token",
                "client_processes",
            )
        },
    }
    used = offline_rounds[: len(serve_rounds)]
    if used and all(r["cpu_s"] is not None for r in used):
        # both of a round's passes (all at once, then `clients` at a time), by process
        tokens = sum(r["output_tokens"] + r["matched_output_tokens"] for r in used)
        totals: dict[str, float] = {}
        for r in used:
            for part, seconds in r["cpu_s"].items():
                totals[part] = totals.get(part, 0.0) + seconds
        result["offline_cpu_us_per_token"] = {
            part: totals[part] / tokens * 1e6 for part in sorted(totals)
        }
    if "variant" in rounds:
        result["variant"] = _variant_figures(rounds["variant"], serve_rounds, offline_rounds, args)
    if args.rank_counters and used:
        result["rank_counters"] = _rank_figures(serve_rounds, used)
        if "variant" in rounds:
            variant = _rank_figures(rounds["variant"], [])["serve"]
            result["rank_counters"] = {"serve": result["rank_counters"].pop("serve")} | {
                "variant": variant,
                **result["rank_counters"],
            }
    if ttft is not None:
        result["ttft_phase"] = ttft
    return result


def _variant_figures(variant: list[dict], serve: list[dict], offline: list[dict], args) -> dict:
    """The second server's figures, against offline and against the first server, round by
    round (each a pair run back to back)."""
    summary = _summary(variant, args.clients, args)

    def rate(part: dict) -> float:
        return part["tokens"] / part["window_s"]

    return {
        "flags": args.variant_flags,
        "tree": args.variant_tree,
        "env": args.variant_env,
        "serve_output_tokens_per_s": summary["output_tokens_per_s"],
        "serve_over_offline": common.percentile(
            [rate(v) / (o["output_tokens"] / o["window_s"]) for v, o in zip(variant, offline)], 50
        ),
        "variant_over_serve": common.percentile(
            [rate(v) / rate(s) for v, s in zip(variant, serve)], 50
        ),
        "variant_over_serve_rounds": [rate(v) / rate(s) for v, s in zip(variant, serve)],
        **{
            key: summary[key]
            for key in ("ttft_p50_s", "itl_p50_s", "tokens_per_chunk", "cpu_us_per_token")
        },
    }


def _rank_figures(serve_rounds: list[dict], offline_rounds: list[dict]) -> dict:
    """Each path's per-rank counters over all its rounds (rank_counters.summarize)."""
    paths = {}
    for path, rounds, prefix in (
        ("serve", serve_rounds, None),
        ("offline", offline_rounds, ""),
        ("offline_matched", offline_rounds, "matched_"),
    ):
        total: dict = {}
        tokens = 0
        for r in rounds:
            rank_counters.add(total, r["ranks"] if prefix is None else r[prefix + "ranks"])
            tokens += r["tokens"] if prefix is None else r[prefix + "output_tokens"]
        if tokens:
            paths[path] = rank_counters.summarize(total, tokens)
    return paths


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _table(args, result: dict) -> list[str]:
    lines = [
        f"{result['model']} PP={args.pp}, {args.input_len} + {args.output_len} tokens a request",
        "| phase | streams | requests | output tok/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
        "|---|---|---|---|---|---|",
        f"| serve | {args.clients} | {result['requests']} in {result['rounds']} round(s)"
        + (" (time limit)" if result["timed_out"] else "")
        + f" | {result['serve_output_tokens_per_s']:.1f} | {_ms(result['ttft_p50_s'])} / "
        f"{_ms(result['ttft_p99_s'])} | {_ms(result['itl_p50_s'])} / {_ms(result['itl_p99_s'])} |",
        f"| offline | - | {args.requests} a round | {result['offline_output_tokens_per_s']:.1f}"
        " | | |",
    ]
    ttft = result.get("ttft_phase")
    if ttft is not None:
        lines.append(
            f"| serve (TTFT) | {ttft['clients']} | {ttft['requests']}"
            + (" (time limit)" if ttft["timed_out"] else "")
            + f" | {ttft['output_tokens_per_s']:.1f} | {_ms(ttft['ttft_p50_s'])} / "
            f"{_ms(ttft['ttft_p99_s'])} | {_ms(ttft['itl_p50_s'])} / {_ms(ttft['itl_p99_s'])} |"
        )
    rounds = ", ".join(f"{ratio:.2f}" for ratio in result["serve_over_offline_rounds"])
    lines.append(
        f"serve / offline = {result['serve_over_offline']:.3f} (target >= 0.8; the median of "
        f"the rounds' {rounds}; load average {result['load_average'][0]:.1f} -> "
        f"{result['load_average'][1]:.1f})"
    )
    lines.append(
        f"offline {args.clients} prompts at a time / all at once = "
        f"{result['offline_matched_over_offline']:.3f}, serve / that = "
        f"{result['serve_over_offline_matched']:.3f} (medians)"
    )
    if result["tokens_per_chunk"] is not None:
        cpu = result["server_cpu_s_per_token"]
        lines.append(
            f"serve: {result['tokens_per_chunk']:.2f} tokens a streamed chunk, clients in "
            f"{result['client_processes']} process(es)"
            + (f", server CPU {cpu * 1e6:.1f} us a token (all ranks)" if cpu is not None else "")
        )
    if result["cpu_us_per_token"] is not None:
        by_part = result["cpu_us_per_token"]
        lines.append(
            "serve's CPU a token (us, user + system): "
            + ", ".join(f"{name} {value:.1f}" for name, value in by_part.items())
        )
    if result.get("offline_cpu_us_per_token") is not None:
        lines.append(
            "offline's CPU a token (us): "
            + ", ".join(f"{n} {v:.1f}" for n, v in result["offline_cpu_us_per_token"].items())
        )
    variant = result.get("variant")
    if variant is not None:
        rounds = ", ".join(f"{ratio:.2f}" for ratio in variant["variant_over_serve_rounds"])
        lines.append(
            f"variant ({variant['flags'] or ''} {variant['tree'] or ''} "
            f"{' '.join(variant['env'])}): "
            f"{variant['serve_output_tokens_per_s']:.1f} tok/s, / offline "
            f"{variant['serve_over_offline']:.3f}, / serve {variant['variant_over_serve']:.3f} "
            f"(median of the rounds' {rounds}); {variant['tokens_per_chunk']:.2f} tokens a "
            "chunk; CPU a token (us): "
            + ", ".join(f"{n} {v:.1f}" for n, v in (variant["cpu_us_per_token"] or {}).items())
        )
    if result.get("rank_counters"):
        lines += rank_counters.table(result["rank_counters"])
    if ttft is not None:
        lines.append(
            f"TTFT p50 at {ttft['clients']} streams = {_ms(ttft['ttft_p50_s'])} ms "
            "(target < 100 ms on the H200)"
        )
    lines.append(
        "seconds: " + ", ".join(f"{name} {value:.1f}" for name, value in result["seconds"].items())
    )
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return common.run_benchmark(parser, argv, worker, drive)


if __name__ == "__main__":
    sys.exit(main())

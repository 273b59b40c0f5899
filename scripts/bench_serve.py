#!/usr/bin/env python
"""Serving benchmark (issue 17): N concurrent streaming clients against `ppruntime serve`,
beside the same prompts through offline `LLM.generate`, in one run.

    python scripts/bench_serve.py --json                       # tiny, PP=2, 64 streams
    python scripts/bench_serve.py --preset bench-small --clients 16 --json
    python scripts/bench_serve.py --shape 1b --pp 1 --clients 16 --json   # GPU: random 1B

The driver starts the offline run (`mpirun -n PP python this --worker`) and then the
server (`mpirun -n PP ppruntime serve --port 0`) back to back; the clients run in the
driver's event loop on loopback, a bounded number of requests within a time limit.
Reported: output tokens/s of both and their ratio, TTFT and inter-token latency
percentiles of the streams.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common

START_TIMEOUT_S = 180.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--model", default=None, help="a checkpoint directory instead")
    parser.add_argument(
        "--shape",
        default=None,
        help="write a random bf16 checkpoint of this bench_gpu.py shape (1b, 8b) and serve it",
    )
    parser.add_argument("--workdir", default=None, help="where --shape writes (a temp dir)")
    parser.add_argument("--pp", type=int, default=2)
    parser.add_argument("--clients", type=int, default=64, help="concurrent streams")
    parser.add_argument("--requests", type=int, default=None, help="default: 2 x clients")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=64)
    parser.add_argument("--time-limit", type=float, default=300.0, help="seconds for the clients")
    parser.add_argument("--json", action="store_true", help="print one JSON object last")


def _prompts(args) -> list[list[int]]:
    import numpy as np

    rng = np.random.default_rng(0)
    count = args.requests or 2 * args.clients
    return [rng.integers(0, 256, size=args.input_len).tolist() for _ in range(count)]


def worker(args: argparse.Namespace) -> None:
    """Offline: the same prompts through LLM.generate under mpirun."""
    common.one_torch_thread()
    from ppruntime import LLM, SamplingParams

    llm = LLM(
        args.model,
        preset=None if args.model else args.preset,
        pp_size=args.pp,
        max_batch_size=args.max_batch_size,
    )
    params = SamplingParams(max_tokens=args.output_len, temperature=0, ignore_eos=True)
    prompts = _prompts(args)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    window = time.perf_counter() - start
    llm.shutdown()
    tokens = sum(len(o.token_ids) for o in outputs)
    common.emit_worker_result({"output_tokens": tokens, "window_s": window})


class _Server:
    def __init__(self, args) -> None:
        command = common.mpi_command(
            args.pp,
            [
                sys.executable,
                "-m",
                "ppruntime",
                "serve",
                "--preset",
                args.preset,
                "--port",
                "0",
                "--max-batch-size",
                str(args.max_batch_size),
                "--max-waiting",
                "100000",
            ],
        )
        self.proc = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=common.worker_env(),
            start_new_session=True,
        )
        self.url = None
        self.ready = threading.Event()
        self.output: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(START_TIMEOUT_S):
            self.stop()
            raise RuntimeError("the server did not start:\n" + "".join(self.output[-40:]))

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.output.append(line)
            if "listening on http://" in line:
                self.url = line.split("listening on ")[1].split()[0]
                self.ready.set()

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def _one_stream(client, url: str, prompt: list[int], args, record: list) -> None:
    body = {
        "prompt": prompt,
        "max_tokens": args.output_len,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
    }
    start = time.perf_counter()
    arrivals = []
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0]["text"] is not None:
                    arrivals.append(time.perf_counter())
    record.append((start, arrivals))


async def _clients(url: str, prompts, args) -> tuple[list, float]:
    import httpx

    record: list = []
    queue = list(prompts)
    limits = httpx.Limits(max_connections=args.clients, max_keepalive_connections=args.clients)
    async with httpx.AsyncClient(timeout=args.time_limit, limits=limits) as client:

        async def loop() -> None:
            while queue:
                await _one_stream(client, url, queue.pop(), args, record)

        start = time.perf_counter()
        await asyncio.wait_for(
            asyncio.gather(*(loop() for _ in range(args.clients))), args.time_limit
        )
        return record, time.perf_counter() - start


def drive(args: argparse.Namespace) -> int:
    worker_args = [
        "--preset",
        args.preset,
        "--pp",
        str(args.pp),
        "--clients",
        str(args.clients),
        "--input-len",
        str(args.input_len),
        "--output-len",
        str(args.output_len),
        "--max-batch-size",
        str(args.max_batch_size),
    ]
    if args.requests:
        worker_args += ["--requests", str(args.requests)]
    offline = common.run_mpi_worker(args.pp, os.path.abspath(__file__), worker_args)
    offline_tput = offline["output_tokens"] / offline["window_s"]
    server = _Server(args)
    try:
        record, window = asyncio.run(_clients(server.url, _prompts(args), args))
    finally:
        server.stop()
    tokens = len(record) * args.output_len
    ttft = [arrivals[0] - start for start, arrivals in record if arrivals]
    itl = [b - a for _, arrivals in record for a, b in zip(arrivals, arrivals[1:])]
    serve_tput = tokens / window
    result = {
        "model": args.shape or args.model or args.preset,
        "pp": args.pp,
        "clients": args.clients,
        "requests": len(record),
        "serve_output_tokens_per_s": serve_tput,
        "offline_output_tokens_per_s": offline_tput,
        "serve_over_offline": serve_tput / offline_tput,
        "ttft_p50_s": common.percentile(ttft, 50),
        "ttft_p99_s": common.percentile(ttft, 99),
        "itl_p50_s": common.percentile(itl, 50),
        "itl_p99_s": common.percentile(itl, 99),
    }
    lines = [
        f"{result['model']} PP={args.pp}, {args.clients} concurrent streams, "
        f"{len(record)} requests of {args.input_len} + {args.output_len} tokens",
        f"  serve:   {serve_tput:.1f} output tok/s; TTFT p50/p99 "
        f"{result['ttft_p50_s'] * 1e3:.1f}/{result['ttft_p99_s'] * 1e3:.1f} ms, ITL p50/p99 "
        f"{result['itl_p50_s'] * 1e3:.1f}/{result['itl_p99_s'] * 1e3:.1f} ms",
        f"  offline: {offline_tput:.1f} output tok/s",
        f"  serve / offline = {result['serve_over_offline']:.3f}",
    ]
    common.emit(lines, result, args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    return common.run_benchmark(parser, argv, worker, drive)


if __name__ == "__main__":
    sys.exit(main())

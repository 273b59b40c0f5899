#!/usr/bin/env python
"""The HTTP process of `ppruntime serve` alone: its CPU a streamed token, against a fake
engine, so that a change to the streaming path can be measured on a loaded machine.

    python scripts/bench_http_process.py --json
    python scripts/bench_http_process.py --base /tmp/main-tree --json   # against another tree

This process plays the engine: it starts the HTTP process (`python -m
ppruntime.api.http_process`, as `ppruntime serve` does) on a socket pair, answers its
submits with one token a request every other step (two microbatches, as PP=2 runs them),
a step every `--step-ms`, and ends each request after `--output-len` tokens. The streams
are bench_serve.py's lean clients in `--client-processes` processes. Reported per variant
(the HTTP process's imports and code; rounds alternate between them, every variant's
process up for the whole run): CPU seconds a token (user + system, from /proc and the
clients' own process time: what the work cost, however long it waited for a core), the
tokens a chunk (a HTTP process that is behind takes several steps' tokens at once, which
makes its tokens cheaper), and the output tokens/s the engine side saw.

Variants: "fast" (this tree, uvloop and httptools when installed), "plain" (this tree
with uvloop and httptools made unimportable: the asyncio loop and h11), and with --base
DIR "base" and "base-plain" (the HTTP process of the tree at DIR, e.g. `git archive main
| tar -x -C DIR`, as it is and without uvloop and httptools).
"""

from __future__ import annotations

import argparse
import json
import os
import select
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common

from ppruntime.api.http_link import EngineLink

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STARTUP_S = 60.0
_BLOCKED = {
    "fast": (),
    "plain": ("uvloop", "httptools"),
    "base": (),
    "base-plain": ("uvloop", "httptools"),
}


class _HTTPProcess:
    """One HTTP process on its link, with the code of `tree` and `blocked` unimportable."""

    def __init__(self, name: str, tree: str, blocked: tuple[str, ...], nice: int) -> None:
        self.name = name
        ours, theirs = socket.socketpair()
        code = "".join(f"sys.modules[{module!r}] = None; " for module in blocked)
        code = (
            f"import sys; {code}from ppruntime.api.http_process import main; "
            f"sys.exit(main(['--fd', '{theirs.fileno()}', '--nice', '{nice}']))"
        )
        env = dict(os.environ, PYTHONPATH=tree + os.pathsep + os.environ.get("PYTHONPATH", ""))
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code], pass_fds=(theirs.fileno(),), env=env, cwd=tree
        )
        theirs.close()
        self.link = EngineLink(ours)
        settings = {
            "model": "tiny",
            "served_name": "tiny",
            "vocab_size": 512,
            "max_model_len": 256,
            "capacity": 1024,
            "max_waiting": 100000,
            "max_body_bytes": 2**20,
            "host": "127.0.0.1",
            "port": 0,
            "log_prefix": "[http process under bench_http_process]",
            "log_level": None,  # WARNING to stderr, as `ppruntime serve` runs it by default
            "log_dir": None,
        }
        self.link.send([["hello", settings]])
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            messages = self.link.receive(0.1)
            if messages is None:
                raise RuntimeError(f"{name}: the HTTP process exited while starting")
            listening = [m for m in messages if m[0] in ("listening", "failed")]
            if listening:
                if listening[0][0] == "failed":
                    raise RuntimeError(f"{name}: {listening[0][1]}")
                self.url = f"http://127.0.0.1:{listening[0][1]}"
                return
        raise RuntimeError(f"{name}: the HTTP process did not listen in {STARTUP_S} s")

    def cpu_seconds(self) -> float:
        with open(f"/proc/{self.proc.pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        self.link.close()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _engine(http: _HTTPProcess, output_len: int, step_s: float, until) -> int:
    """Answer the HTTP process's submits with a token a request every other step until
    `until()` (the clients are done); the tokens sent."""
    left: dict[str, int] = {}  # request id -> tokens still to send
    microbatch: dict[str, int] = {}
    submitted = 0
    sent = 0
    step = 0
    next_step = time.perf_counter()
    while not until():
        wait = next_step - time.perf_counter()
        if wait > 0:
            select.select([http.link.sock], [], [], wait)
        messages = http.link.receive()
        if messages is None:
            raise RuntimeError(f"{http.name}: the HTTP process closed the link")
        for message in messages:
            if message[0] == "submit":
                left[message[1]] = output_len
                microbatch[message[1]] = submitted % 2
                submitted += 1
            elif message[0] == "abort":
                left.pop(message[1], None)
        if time.perf_counter() < next_step:
            continue
        wire = []
        for request_id in [r for r in left if microbatch[r] == step % 2]:
            left[request_id] -= 1
            finished = left[request_id] == 0
            wire.append(
                [request_id, [97], "a", finished, "length" if finished else None, None, None]
            )
            if finished:
                del left[request_id], microbatch[request_id]
        if wire:
            http.link.send([["deltas", wire]])
            sent += len(wire)
        step += 1
        next_step += step_s
        next_step = max(next_step, time.perf_counter() - step_s)  # no catching up after a stall
    return sent


def _phase(http: _HTTPProcess, args, pool) -> dict:
    import bench_serve

    prompts = [
        [(7 * index + position) % 256 for position in range(args.input_len)]
        for index in range(args.requests)
    ]
    processes = args.client_processes
    start_at = time.perf_counter() + bench_serve.CLIENT_START_S
    futures = [
        pool.submit(
            bench_serve._client_group,
            http.url,
            prompts[index::processes],
            args.clients // processes + (index < args.clients % processes),
            args.output_len,
            300.0,
            start_at,
            "lean",
        )
        for index in range(processes)
    ]
    cpu_before = http.cpu_seconds()
    sent = _engine(
        http, args.output_len, args.step_ms / 1e3, lambda: all(f.done() for f in futures)
    )
    cpu_after = http.cpu_seconds()
    groups = [future.result() for future in futures]
    record = [entry for group in groups for entry in group[0]]
    tokens = sum(count for _, _, count in record)
    if tokens != sent or any(count != args.output_len for _, _, count in record):
        raise RuntimeError(f"{http.name}: streams reported {tokens} tokens, the engine sent {sent}")
    chunks = sum(len(arrivals) for _, arrivals, _ in record)
    window = max(group[1] for group in groups) - start_at
    return {
        "http_cpu_us_per_token": (cpu_after - cpu_before) / tokens * 1e6,
        "client_cpu_us_per_token": sum(group[3] for group in groups) / tokens * 1e6,
        "tokens_per_chunk": tokens / chunks,
        "output_tokens_per_s": tokens / window,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", default="fast,plain", help="of fast, plain, base, base-plain")
    parser.add_argument("--base", default=None, help="a tree for the 'base' variant")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--requests", type=int, default=256, help="a round's, per variant")
    parser.add_argument("--input-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--step-ms", type=float, default=4.5, help="a microbatch's step")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--client-processes", type=int, default=1)
    parser.add_argument("--nice", type=int, default=0, help="the HTTP processes' nice")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    names = args.variants.split(",")
    if {"base", "base-plain"} & set(names) and not args.base:
        raise SystemExit("bench_http_process: the 'base' variants need --base DIR")
    unknown = set(names) - set(_BLOCKED)
    if unknown:
        raise SystemExit(f"bench_http_process: unknown variants {sorted(unknown)}")
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    common.one_torch_thread()
    load_before = os.getloadavg()[0]
    servers = [
        _HTTPProcess(
            name, args.base if name.startswith("base") else REPO_ROOT, _BLOCKED[name], args.nice
        )
        for name in names
    ]
    results: dict[str, list[dict]] = {name: [] for name in names}
    try:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(args.client_processes, mp_context=context) as pool:
            for index in range(args.rounds):
                order = servers if index % 2 == 0 else servers[::-1]
                for http in order:
                    results[http.name].append(_phase(http, args, pool))
    finally:
        for http in servers:
            http.stop()
    summary = {
        "load_average": [load_before, os.getloadavg()[0]],
        "variants": {
            name: {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
            | {"rounds": rounds}
            for name, rounds in results.items()
        },
    }
    lines = [
        "| variant | HTTP CPU us a token | client CPU us a token | tokens a chunk | tok/s |",
        "|---|---|---|---|---|",
    ]
    for name, figures in summary["variants"].items():
        lines.append(
            f"| {name} | {figures['http_cpu_us_per_token']:.1f} | "
            f"{figures['client_cpu_us_per_token']:.1f} | {figures['tokens_per_chunk']:.2f} | "
            f"{figures['output_tokens_per_s']:.0f} |"
        )
    lines.append(
        f"medians of {args.rounds} rounds; load average {load_before:.1f} -> "
        f"{summary['load_average'][1]:.1f}"
    )
    print("\n".join(lines), flush=True)
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

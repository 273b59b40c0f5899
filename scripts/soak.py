"""Soak test: many requests of random lengths and sampling parameters, random aborts.

    launch/mpirun.sh -n 2 .venv/bin/python scripts/soak.py [--requests 5000] [--seed 0]

PP = the number of ranks (2 above), async mode, the `tiny` preset. Rank 0 keeps
`--concurrency` requests in flight, each with a random prompt (1..--max-prompt token
ids), random sampling parameters and a random max_tokens; about --abort-rate of them
are aborted a random number of steps after submission. Checked at the end:
- every request finished exactly once; "abort" only where an abort was asked; a
  request that was not aborted and ended by "length" has exactly max_tokens tokens;
- every rank's KV blocks are all free again (RankReport from llm.shutdown());
- resident memory (VmRSS of /proc/self/status, every rank) grows less than
  --max-rss-growth between request N/5 (request 1,000 of 5,000) being registered and
  the end, when every request has finished.
The last line on stdout is a JSON summary (`completed`, `aborted`, `kv_blocks_leaked`,
`rss_growth`, ...); the exit status is 0 only when every check passed.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from mpi4py import MPI

from ppruntime import LLM, SamplingParams
from ppruntime.bootstrap import bootstrap
from ppruntime.engine.executor import PipelineExecutor

VALID_REASONS = {"length", "stop", "abort"}


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssProbe:
    """Counts the requests every rank registers; samples RSS when the mark is reached."""

    def __init__(self, mark: int) -> None:
        self.mark = mark
        self.seen = 0
        self.at_mark: int | None = None

    def install(self) -> None:
        original = PipelineExecutor._apply_control
        probe = self

        def _apply_control(executor, control, local_infos=None):
            original(executor, control, local_infos)
            if control.new is not None:
                probe.seen += len(control.new.request_ids)
                if probe.at_mark is None and probe.seen >= probe.mark:
                    probe.at_mark = rss_kib()

        PipelineExecutor._apply_control = _apply_control


def random_params(rng: random.Random, max_tokens: int) -> SamplingParams:
    if rng.random() < 0.3:
        return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=rng.random() < 0.5)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=rng.choice([0.3, 0.7, 1.0, 1.5]),
        top_k=rng.choice([0, -1, 1, 10, 100]),
        top_p=rng.choice([1.0, 0.95, 0.5]),
        min_p=rng.choice([0.0, 0.0, 0.1]),
        seed=rng.choice([None, rng.randrange(1 << 31)]),
        stop_token_ids=rng.choice([(), (), (rng.randrange(512),)]),
        logprobs=rng.choice([None, None, 0, 2]),
        ignore_eos=rng.random() < 0.5,
    )


def drive(llm: LLM, args: argparse.Namespace) -> dict:
    """Rank 0: submit, step, abort; returns counts and the problems found."""
    rng = random.Random(args.seed)
    problems: list[str] = []
    params_of: dict[str, SamplingParams] = {}
    abort_at: dict[str, int] = {}  # request id -> step at which to abort it
    abort_asked: set[str] = set()
    finished: dict[str, str] = {}
    in_flight: set[str] = set()
    next_index, steps = 0, 0
    started = time.monotonic()
    while next_index < args.requests or in_flight:
        while next_index < args.requests and len(in_flight) < args.concurrency:
            length = min(args.max_prompt, max(1, int(rng.lognormvariate(3.5, 1.0))))
            prompt = [rng.randrange(3, 256) for _ in range(length)]
            params = random_params(rng, rng.randrange(1, args.max_tokens + 1))
            request_id = llm.add_request(prompt, params, request_id=f"soak-{next_index}")
            params_of[request_id] = params
            in_flight.add(request_id)
            if rng.random() < args.abort_rate:
                abort_at[request_id] = steps + rng.randrange(0, 30)
            next_index += 1
        for request_id in [r for r, at in abort_at.items() if at <= steps]:
            del abort_at[request_id]
            if llm.abort(request_id):
                abort_asked.add(request_id)
        done, _ = llm.step()
        steps += 1
        for output in done:
            request_id = output.request_id
            if request_id in finished:
                problems.append(f"{request_id} finished twice")
            finished[request_id] = output.finish_reason
            in_flight.discard(request_id)
            abort_at.pop(request_id, None)
            params = params_of.pop(request_id)
            reason = output.finish_reason
            if reason not in VALID_REASONS:
                problems.append(f"{request_id}: finish_reason {reason!r}")
            elif reason == "abort" and request_id not in abort_asked:
                problems.append(f"{request_id}: aborted without being asked")
            elif reason != "abort" and len(output.token_ids) > params.max_tokens:
                problems.append(f"{request_id}: {len(output.token_ids)} > max_tokens")
            elif reason == "length" and len(output.token_ids) != params.max_tokens:
                problems.append(f"{request_id}: length with {len(output.token_ids)} tokens")
        if args.progress and steps % 2000 == 0:
            print(f"soak: {len(finished)}/{args.requests} finished", file=sys.stderr, flush=True)
        if time.monotonic() - started > args.deadline:
            problems.append(f"not finished after {args.deadline} s ({len(finished)} done)")
            break
    aborted = sum(1 for reason in finished.values() if reason == "abort")
    return {
        "completed": len(finished) - aborted,
        "aborted": aborted,
        "abort_asked": len(abort_asked),
        "finished": len(finished),
        "steps": steps,
        "problems": problems,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=48)
    parser.add_argument("--max-prompt", type=int, default=300)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--abort-rate", type=float, default=0.15)
    parser.add_argument("--max-rss-growth", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=3600.0, help="seconds")
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args()

    info = bootstrap()
    probe = RssProbe(mark=max(1, args.requests // 5))
    probe.install()
    started = time.monotonic()
    llm = LLM(preset="tiny", max_model_len=512, exit_workers=False, watchdog_timeout_s=120)
    result = drive(llm, args) if llm.is_driver else {}
    rss_end = rss_kib()  # every request has finished (rank 0) / the pipeline stopped
    reports = llm.shutdown()
    rss = MPI.COMM_WORLD.gather((probe.at_mark, rss_end), root=0)
    if info.rank != 0:
        return 0
    problems = result.pop("problems")
    leaked = sum(r.kv_blocks_total - r.kv_blocks_free for r in reports)
    if leaked:
        problems.append(f"KV blocks not freed: {[(r.rank, r.kv_blocks_free) for r in reports]}")
    growths = [(end - mark) / mark if mark else float("inf") for mark, end in rss]
    growth = max(growths)
    if growth >= args.max_rss_growth:
        problems.append(f"RSS grew {growth:.1%} (limit {args.max_rss_growth:.0%})")
    if result["finished"] != args.requests:
        problems.append(f"{result['finished']} of {args.requests} requests finished")
    summary = {
        "requests": args.requests,
        "pp_size": info.size,
        **result,
        "kv_blocks_leaked": leaked,
        "rss_growth": round(growth, 4),
        "rss_mib": [[round(m / 1024, 1) if m else None, round(e / 1024, 1)] for m, e in rss],
        "seconds": round(time.monotonic() - started, 1),
        "problems": problems[:20],
        "ok": not problems,
    }
    print(json.dumps(summary), flush=True)
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())

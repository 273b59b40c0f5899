"""Cancellation under load and KV exhaustion, in one MPI job (tests/test_failures.py).

    mpirun -n N python tests/failure_scripts/load_job.py [--requests N] [--seed S]

Two engines, one after the other (exit_workers=False, so every rank takes part in
both):
1. cancel: many requests of random lengths and sampling parameters; random aborts
   while they run (right after submission, mid-prefill, mid-decode, twice, and of
   ids that do not exist or have finished);
2. kv: more long requests than the KV cache can hold at once (small kv_cache_blocks):
   they must queue, never crash, and all complete.
After each engine, shutdown's RankReport of every rank must show all KV blocks
free. Rank 0 checks every outcome (an assert ends the job with a traceback) and
prints one line `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time

from ppruntime import LLM, SamplingParams
from ppruntime.bootstrap import bootstrap

FINISH_REASONS = {"length", "stop", "abort"}


def random_params(rng: random.Random, max_tokens: int) -> SamplingParams:
    kind = rng.random()
    if kind < 0.3:
        return SamplingParams(max_tokens=max_tokens, temperature=0)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=rng.choice([0.5, 1.0, 1.3]),
        top_k=rng.choice([0, -1, 5, 50]),
        top_p=rng.choice([1.0, 0.9, 0.5]),
        min_p=rng.choice([0.0, 0.05]),
        seed=rng.choice([None, rng.randrange(1 << 30)]),
        stop_token_ids=rng.choice([(), (rng.randrange(512),)]),
        logprobs=rng.choice([None, 0, 3]),
        ignore_eos=rng.random() < 0.5,
    )


def check_reports(llm: LLM, what: str) -> list:
    reports = llm.shutdown()
    if not llm.is_driver:
        return []
    assert reports is not None and len(reports) == llm.info.size, reports
    for report in reports:
        assert report.kv_blocks_free == report.kv_blocks_total, (what, report)
    return [[r.rank, r.kv_blocks_free, r.kv_blocks_total] for r in reports]


def run_cancel(args, rng: random.Random) -> dict:
    llm = LLM(preset="tiny", max_model_len=256, exit_workers=False, watchdog_timeout_s=60)
    if not llm.is_driver:
        check_reports(llm, "cancel")
        return {}
    submitted: dict[str, SamplingParams] = {}
    abort_asked: set[str] = set()
    finished: dict[str, object] = {}
    pending = list(range(args.requests))
    deadline = time.monotonic() + args.deadline
    while pending or len(finished) < len(submitted):
        assert time.monotonic() < deadline, "cancel phase did not finish in time"
        for _ in range(rng.randrange(0, 6)):
            if not pending:
                break
            index = pending.pop()
            prompt = [rng.randrange(3, 256) for _ in range(rng.randrange(1, 120))]
            params = random_params(rng, rng.randrange(1, 60))
            request_id = llm.add_request(prompt, params, request_id=f"c{index}")
            submitted[request_id] = params
            if rng.random() < 0.1:  # abort before it is ever scheduled
                assert llm.abort(request_id)
                abort_asked.add(request_id)
        running = [r for r in submitted if r not in finished]
        if running and rng.random() < 0.3:
            victim = rng.choice(running)
            if llm.abort(victim):
                abort_asked.add(victim)
            llm.abort(victim)  # twice: harmless
        assert not llm.abort("no-such-request")
        done, _ = llm.step()
        for output in done:
            assert output.request_id not in finished, f"{output.request_id} finished twice"
            finished[output.request_id] = output
    for request_id, output in finished.items():
        params = submitted[request_id]
        assert output.finish_reason in FINISH_REASONS, output
        if output.finish_reason == "abort":
            assert request_id in abort_asked, f"{request_id} aborted but nobody asked"
        else:
            assert len(output.token_ids) <= params.max_tokens, output
            if output.finish_reason == "length":
                assert len(output.token_ids) == params.max_tokens, output
        if request_id in abort_asked:
            assert not llm.abort(request_id)  # finished: no longer known
    aborted = sum(1 for o in finished.values() if o.finish_reason == "abort")
    reports = check_reports(llm, "cancel")
    return {
        "submitted": len(submitted),
        "finished": len(finished),
        "abort_asked": len(abort_asked),
        "aborted": aborted,
        "reports": reports,
    }


def run_kv(args, rng: random.Random) -> dict:
    block_size, max_model_len = 16, 256
    blocks = 2 * max_model_len // block_size + 3  # two max-length requests, barely
    llm = LLM(
        preset="tiny",
        max_model_len=max_model_len,
        block_size=block_size,
        kv_cache_blocks=blocks,
        exit_workers=False,
        watchdog_timeout_s=60,
    )
    if not llm.is_driver:
        check_reports(llm, "kv")
        return {}
    prompts, params = [], []
    for _ in range(args.kv_requests):
        length = rng.randrange(100, 200)
        prompts.append([rng.randrange(3, 256) for _ in range(length)])
        params.append(
            SamplingParams(
                max_tokens=rng.randrange(20, max_model_len - length),
                temperature=0,
                ignore_eos=True,
            )
        )
    outputs = llm.generate(prompts, params, use_tqdm=False)
    for output, p in zip(outputs, params):
        assert output.finish_reason == "length", output
        assert len(output.token_ids) == p.max_tokens, output
    # the same requests one at a time give the same greedy tokens (queueing changed nothing)
    for index in (0, len(prompts) - 1):
        (alone,) = llm.generate([prompts[index]], params[index], use_tqdm=False)
        assert alone.token_ids == outputs[index].token_ids, index
    preemptions = getattr(llm._executor.scheduler, "num_preemptions", None)
    reports = check_reports(llm, "kv")
    return {
        "requests": len(outputs),
        "kv_blocks": blocks,
        "preemptions": preemptions,
        "reports": reports,
    }


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=150)
    parser.add_argument("--kv-requests", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--deadline", type=float, default=120.0)
    args = parser.parse_args()
    info = bootstrap()
    result = {
        "cancel": run_cancel(args, random.Random(args.seed)),
        "kv": run_kv(args, random.Random(args.seed + 1)),
    }
    if info.rank == 0:
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

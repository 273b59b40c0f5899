"""GIL pressure in async mode: one stage busy in pure Python between steps, many runs.

    mpirun -n 2 python tests/failure_scripts/gil_pressure.py [--runs 20] [--work-ms 30]

A baseline engine without pressure gives the reference tokens. Then `--runs` engines,
one after the other in this one job (exit_workers=False), each with
PPRUNTIME_PYTHON_WORK_MS set (rank 1, rank 0, or both, in turn): before every forward
that rank busy-loops in pure Python while its relay and watchdog threads need the GIL.
Each run has its own timeout guard (a timer that aborts the job naming the run) and
the engine's watchdog. Rank 0 prints `RESULT {json}`: runs, mismatching runs, seconds,
and per run the knob's setting and each rank's [forward seconds, forwards] (the
"forward" span of the rank's tracer, which includes the knob's work).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from ppruntime import LLM, SamplingParams
from ppruntime.bootstrap import bootstrap
from ppruntime.comm.failure import report_and_abort

KNOB = "PPRUNTIME_PYTHON_WORK_MS"


def workload() -> tuple[list, list[SamplingParams]]:
    prompts = [f"pressure prompt {i} " * (1 + i % 4) for i in range(8)]
    params = [
        SamplingParams(max_tokens=12 + i, temperature=0, ignore_eos=True)
        if i % 2 == 0
        else SamplingParams(max_tokens=12 + i, temperature=0.9, top_p=0.95, seed=100 + i)
        for i in range(len(prompts))
    ]
    return prompts, params


def run_once(
    info, label: str, timeout_s: float, watchdog_s: float
) -> tuple[list, list] | tuple[None, None]:
    llm = LLM(preset="tiny", max_model_len=256, exit_workers=False, watchdog_timeout_s=watchdog_s)
    if not llm.is_driver:
        llm.shutdown()
        return None, None
    guard = threading.Timer(
        timeout_s, report_and_abort, (info, f"GIL pressure run {label} hung for {timeout_s} s")
    )
    guard.daemon = True
    guard.start()
    prompts, params = workload()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    reports = llm.shutdown()
    guard.cancel()
    for report in reports or []:
        assert report.kv_blocks_free == report.kv_blocks_total, (label, report)
    forwards = [[r.busy_s.get("forward", 0.0), r.batches] for r in reports]
    return [output.token_ids for output in outputs], forwards


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--work-ms", type=float, default=30.0)
    parser.add_argument("--run-timeout", type=float, default=60.0)
    args = parser.parse_args()
    info = bootstrap()
    last = info.size - 1
    os.environ.pop(KNOB, None)
    reference, _ = run_once(info, "baseline", args.run_timeout, watchdog_s=20)
    patterns = [
        f"{last}:{args.work_ms:g}",
        f"0:{args.work_ms:g}",
        f"0:{args.work_ms:g},{last}:{args.work_ms:g}",
    ]
    mismatches, seconds, knobs, forwards = [], [], [], []
    for run in range(args.runs):
        os.environ[KNOB] = patterns[run % len(patterns)]  # every rank sets the same
        started = time.monotonic()
        tokens, busy = run_once(
            info, f"{run} ({os.environ[KNOB]})", args.run_timeout, watchdog_s=20
        )
        seconds.append(round(time.monotonic() - started, 2))
        knobs.append(os.environ[KNOB])
        forwards.append(busy)
        if tokens is not None and tokens != reference:
            mismatches.append(run)
    os.environ.pop(KNOB, None)
    if info.rank == 0:
        result = {
            "runs": args.runs,
            "mismatches": mismatches,
            "seconds": seconds,
            "work_ms": args.work_ms,
            "knobs": knobs,
            "forwards": forwards,
        }
        print("RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

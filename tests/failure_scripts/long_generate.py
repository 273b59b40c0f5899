"""A long generation under mpirun, for the failure tests (tests/test_failures.py).

    mpirun -n N python tests/failure_scripts/long_generate.py MARKER_DIR [--max-tokens N]
        [--prompts N] [--watchdog-timeout S]

Every rank writes its pid to MARKER_DIR/pid.<rank> before loading. Rank 0 streams the
generation and, once the first token of every prompt has come back, prints
"GENERATING" (and writes MARKER_DIR/generating). At the end rank 0 prints one JSON
line per request (request_id, finish_reason, number of tokens), then "DONE", and
writes the same lines to MARKER_DIR/outputs.jsonl (Open MPI stops forwarding output
once mpirun itself got SIGTERM). Exit status: 143 if SIGTERM stopped it, else 0.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from mpi4py import MPI  # noqa: F401  (MPI is initialised by ppruntime.bootstrap)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("marker_dir")
    parser.add_argument("--max-tokens", type=int, default=1500)
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--watchdog-timeout", type=float, default=None)
    args = parser.parse_args()
    markers = Path(args.marker_dir)

    from ppruntime import LLM, SamplingParams
    from ppruntime.bootstrap import bootstrap
    from ppruntime.comm.failure import termination_requested

    info = bootstrap()
    (markers / f"pid.{info.rank}").write_text(str(os.getpid()))
    llm = LLM(preset="tiny", watchdog_timeout_s=args.watchdog_timeout)
    params = SamplingParams(max_tokens=args.max_tokens, temperature=0, ignore_eos=True)
    prompts = [f"prompt number {i}" for i in range(args.prompts)]
    started: set[str] = set()
    tokens: dict[str, int] = {}
    reasons: dict[str, str | None] = {}
    announced = False
    for delta in llm.generate_stream(prompts, params):
        tokens[delta.request_id] = tokens.get(delta.request_id, 0) + len(delta.token_ids)
        if delta.token_ids:
            started.add(delta.request_id)
        if delta.finished:
            reasons[delta.request_id] = delta.finish_reason
        if not announced and len(started) == len(prompts):
            announced = True
            (markers / "generating").write_text("")
            print("GENERATING", flush=True)
    lines = [
        json.dumps({"request_id": rid, "finish_reason": reasons.get(rid), "tokens": count})
        for rid, count in sorted(tokens.items())
    ]
    (markers / "outputs.jsonl").write_text("".join(line + "\n" for line in lines))
    for line in lines:
        print(line, flush=True)
    reports = llm.shutdown()
    (markers / "reports.json").write_text(
        json.dumps([[r.rank, r.kv_blocks_free, r.kv_blocks_total] for r in reports or []])
    )
    print("DONE", flush=True)
    return 143 if termination_requested.is_set() else 0


if __name__ == "__main__":
    sys.exit(main())

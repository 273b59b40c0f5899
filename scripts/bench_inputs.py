#!/usr/bin/env python
"""Step-input benchmark (issue 6): allocations and bytes copied per decode step.

    python scripts/bench_inputs.py --json

One MPI job of two ranks (tiny preset, block size 16) runs requests with prompt
lengths spread over several pages and enough output tokens to cross page
boundaries. From each rank's StepCounters and block-table counters it reports:

  allocs_per_decode_step: pooled-buffer allocations during decode steps / decode steps;
  bytes_per_step: step-input bytes written per step, by buffer;
  block_table_copies_off_boundary: block-table writes not explained by requests
      joining (one row write each) or crossing a page boundary (one entry write per
      new page), the expected numbers computed from the prompt and output lengths.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _bench_common as common


def worker(args) -> None:
    common.one_torch_thread()
    import numpy as np

    from ppruntime.api.llm import LLM
    from ppruntime.engine.sampling_params import SamplingParams

    llm = LLM(
        preset=args.preset,
        pp_size=2,
        max_batch_size=args.max_batch_size,
        max_num_tokens=4096,  # whole prompts in one chunk: one row write per request
        block_size=args.block_size,
        exit_workers=True,
    )
    rng = np.random.default_rng(0)
    lengths = rng.integers(args.min_prompt, args.max_prompt + 1, size=args.num_requests)
    prompts = [rng.integers(0, 256, size=int(n), dtype=np.int32) for n in lengths]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    reports = llm.shutdown()
    common.emit_worker_result(
        {
            "prompt_lengths": lengths.tolist(),
            "output_lengths": [len(o.token_ids) for o in outputs],
            "ranks": [
                {
                    "rank": r.rank,
                    "step_counters": r.step_counters,
                    "block_table_counters": r.block_table_counters,
                }
                for r in reports
            ],
        }
    )


def drive(args) -> int:
    run = common.run_mpi_worker(
        2,
        os.path.abspath(__file__),
        [
            "--preset",
            args.preset,
            "--num-requests",
            str(args.num_requests),
            "--min-prompt",
            str(args.min_prompt),
            "--max-prompt",
            str(args.max_prompt),
            "--output-len",
            str(args.output_len),
            "--block-size",
            str(args.block_size),
            "--max-batch-size",
            str(args.max_batch_size),
        ],
    )
    bs = args.block_size
    joins = 0
    crossings = 0
    blocks = 0
    for prompt, output in zip(run["prompt_lengths"], run["output_lengths"]):
        computed = prompt + output - 1  # the last sampled token is never computed
        at_join = math.ceil(prompt / bs)
        total = math.ceil(computed / bs)
        joins += 1
        crossings += total - at_join
        blocks += total
    lines = [
        f"{len(run['prompt_lengths'])} requests, prompts {args.min_prompt}-{args.max_prompt} "
        f"tokens, {args.output_len} output tokens, block size {bs}: expected {joins} row "
        f"writes (joins) and {crossings} entry writes (page crossings)"
    ]
    per_rank = []
    for rank in run["ranks"]:
        steps = rank["step_counters"]
        table = rank["block_table_counters"]
        decode_steps = max(steps["decode_steps"], 1)
        allocs = steps["decode_step_allocations"] / decode_steps
        off = abs(table["row_writes"] - joins) + abs(table["entry_writes"] - crossings)
        bytes_per_step = {k: v / max(steps["steps"], 1) for k, v in steps["bytes_written"].items()}
        per_rank.append(
            {
                "rank": rank["rank"],
                "steps": steps["steps"],
                "decode_steps": steps["decode_steps"],
                "allocations_total": steps["allocations"],
                "allocs_per_decode_step": allocs,
                "bytes_per_step": bytes_per_step,
                "block_table_row_writes": table["row_writes"],
                "block_table_entry_writes": table["entry_writes"],
                "block_table_bytes": table["bytes_written"],
                "expected_block_table_bytes": blocks * 4,
                "off_boundary": off,
            }
        )
        lines.append(
            f"rank {rank['rank']}: {steps['steps']} steps ({steps['decode_steps']} decode), "
            f"{allocs:.3f} allocations/decode step ({steps['allocations']} at start-up), "
            f"{sum(bytes_per_step.values()):.0f} input bytes/step; block table: "
            f"{table['row_writes']} row + {table['entry_writes']} entry writes, "
            f"{table['bytes_written']} bytes (expected {blocks * 4}); off boundary {off}"
        )
    result = {
        "allocs_per_decode_step": max(r["allocs_per_decode_step"] for r in per_rank),
        "block_table_copies_off_boundary": max(r["off_boundary"] for r in per_rank),
        "expected_row_writes": joins,
        "expected_entry_writes": crossings,
        "ranks": per_rank,
    }
    lines.append(
        f"allocs_per_decode_step = {result['allocs_per_decode_step']}, "
        f"block_table_copies_off_boundary = {result['block_table_copies_off_boundary']}"
    )
    common.emit(lines, result, args.json)
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--num-requests", type=int, default=24)
    parser.add_argument("--min-prompt", type=int, default=5)
    parser.add_argument("--max-prompt", type=int, default=70)
    parser.add_argument("--output-len", type=int, default=60)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int, default=8)
    return common.run_benchmark(parser, argv, worker, drive)


if __name__ == "__main__":
    sys.exit(main())

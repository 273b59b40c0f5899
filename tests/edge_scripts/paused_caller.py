"""Rank 0's caller stops stepping with batches in flight, longer than the watchdog timeout."""

import sys
import time

from ppruntime import LLM, SamplingParams

pause_s = float(sys.argv[1])
llm = LLM(preset="tiny", device="cpu", exit_workers=False, watchdog_timeout_s=1.0)
if llm.is_driver:
    stream = llm.generate_stream(
        [[1, 2, 3 + i] for i in range(4)], SamplingParams(max_tokens=30, ignore_eos=True)
    )
    next(stream)
    assert llm._executor.table.num_in_flight_batches > 0
    time.sleep(pause_s)  # the consumer does something else: not a stall
    tokens = sum(len(delta.token_ids) for delta in stream) + 1
    reports = llm.shutdown()
    print(f"tokens {tokens} free {[r.kv_blocks_free == r.kv_blocks_total for r in reports]}")

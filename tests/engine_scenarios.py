"""Shared test scenarios: a decode-only ScheduledBatch, and aborting one streamed
request mid-decode while others run to their length."""

from __future__ import annotations

import numpy as np

from ppruntime import SamplingParams
from ppruntime.engine.scheduler import ScheduledBatch


def decode_batch(slots, starts) -> ScheduledBatch:
    """One decode token for each slot at its start position (nothing admitted)."""
    count = len(slots)
    return ScheduledBatch(
        batch_id=0,
        slots=np.asarray(slots, dtype=np.intp),
        num_new=np.ones(count, np.int32),
        starts=np.asarray(starts, dtype=np.int32),
        sample_mask=np.ones(count, bool),
        block_counts=np.zeros(count, np.int32),
        block_ids=np.zeros(0, np.int32),
        admit_seq_ids=np.zeros(0, np.int64),
        admit_slots=np.zeros(0, np.intp),
        preempt_slots=np.zeros(0, np.intp),
    )


def abort_one_mid_decode(llm, prompts, others_tokens: int = 40, victim_tokens: int = 200):
    """Stream prompts[0] (victim_tokens long) beside the others (others_tokens), abort the
    victim once it streamed 5 tokens, step until every request finished.

    Returns (finished outputs by request id, the victim's id, the others' ids); asserts
    that the abort was taken."""
    params = SamplingParams(max_tokens=others_tokens, temperature=0, ignore_eos=True)
    long_params = SamplingParams(max_tokens=victim_tokens, temperature=0, ignore_eos=True)
    victim = llm.add_request(np.asarray(prompts[0]), long_params, stream=True)
    others = [llm.add_request(np.asarray(p), params) for p in prompts[1:]]
    finished, streamed, aborted = {}, 0, False
    for _ in range(10_000):
        done, deltas = llm.step()
        finished.update((output.request_id, output) for output in done)
        streamed += sum(len(d.token_ids) for d in deltas if d.request_id == victim)
        if streamed >= 5 and not aborted:
            aborted = llm.abort(victim)
        if len(finished) == len(prompts):
            break
    assert aborted, "the victim finished before it could be aborted"
    return finished, victim, others

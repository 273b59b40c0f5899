"""The step-input counters (DESIGN §2.3): nothing allocated per decode step, and the
block table written only when a sequence joins or crosses a page boundary."""

from __future__ import annotations

import math

import pytest

from ppruntime import LLM, SamplingParams

BLOCK_SIZE = 4
NEW_TOKENS = 40
# prompt lengths (bos included) around page boundaries: 1, 3, 4, 5, 8, 13 tokens
PROMPTS = [[256], [256, 7, 8], [256, 7, 8, 9], [256, 1, 2, 3, 4], list(range(248, 256)), [9] * 13]
PARAMS = SamplingParams(max_tokens=NEW_TOKENS, temperature=0, ignore_eos=True)


def _blocks(tokens: int) -> int:
    return math.ceil(tokens / BLOCK_SIZE)


def _expected_block_writes(prompt_lengths: list[int], outputs: list[int]) -> tuple[int, int]:
    """(row writes, entry writes) for prompts prefilled in one chunk each.

    A request is admitted with ceil(P / B) blocks (one row write), then the KV of
    P + N - 1 tokens is computed (the last sampled token never is): every block beyond
    the first row is one page-boundary crossing (one entry write).
    """
    rows = len(prompt_lengths)
    entries = sum(
        _blocks(prompt + generated - 1) - _blocks(prompt)
        for prompt, generated in zip(prompt_lengths, outputs)
    )
    return rows, entries


@pytest.fixture(scope="module")
def measured():
    """Counters over a warm engine's second batch, and the final report."""
    llm = LLM(preset="tiny", deterministic=True, block_size=BLOCK_SIZE, max_batch_size=8)
    try:
        llm.generate(PROMPTS[:2], PARAMS, use_tqdm=False)  # warm-up
        pool = llm._executor.runner.pool.counters
        table = llm._executor.table.counters
        before = (pool.allocations, pool.decode_steps, pool.decode_step_allocations)
        table_before = (table.row_writes, table.entry_writes, table.bytes_written)
        outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        after = (pool.allocations, pool.decode_steps, pool.decode_step_allocations)
        table_after = (table.row_writes, table.entry_writes, table.bytes_written)
    finally:
        reports = llm.shutdown()
    deltas = {
        "allocations": after[0] - before[0],
        "decode_steps": after[1] - before[1],
        "decode_step_allocations": after[2] - before[2],
        "row_writes": table_after[0] - table_before[0],
        "entry_writes": table_after[1] - table_before[1],
        "block_table_bytes": table_after[2] - table_before[2],
    }
    return deltas, outputs, reports[0]


def test_no_allocations_per_decode_step(measured):
    deltas, outputs, report = measured
    assert deltas["decode_steps"] >= NEW_TOKENS - 1
    assert deltas["allocations"] == 0
    assert deltas["decode_step_allocations"] == 0
    assert report.step_counters["decode_step_allocations"] == 0
    assert report.step_counters["decode_steps"] > 0


def test_block_table_written_only_at_page_boundaries(measured):
    deltas, outputs, report = measured
    assert all(len(output.token_ids) == NEW_TOKENS for output in outputs)
    lengths = [len(prompt) for prompt in PROMPTS]
    rows, entries = _expected_block_writes(lengths, [len(o.token_ids) for o in outputs])
    assert deltas["row_writes"] == rows == len(PROMPTS)  # one per admission
    assert deltas["entry_writes"] == entries
    total_blocks = sum(_blocks(p + NEW_TOKENS - 1) for p in lengths)
    assert deltas["block_table_bytes"] == 4 * total_blocks  # int32 entries, each once
    assert report.kv_blocks_free == report.kv_blocks_total


def test_step_bytes_are_proportional_to_tokens(measured):
    """Per-step writes scale with the tokens and sequences of the step, nothing more."""
    _, _, report = measured
    written = report.step_counters["bytes_written"]
    assert written["positions"] == written["slot_mapping"] == 8 * report.tokens_computed
    assert written["token_ids"] == 8 * report.tokens_computed  # first stage
    assert written["rows"] == written["seq_lens"]


def test_rank_counters_count_microbatches_sequences_and_cpu_by_span(measured):
    """The counters a rank reports (rank_stats.COUNTERS; /metrics and bench_serve.py read
    them): the warm-up's 2 and the batch's 6 requests are each prefilled in one
    microbatch of their own call, then decoded one token a step, so every generated
    token but a request's first is one sequence of a decode microbatch."""
    _, outputs, report = measured
    counters = report.counters
    assert counters["batches"] == report.batches and counters["iterations"] == report.iterations
    assert counters["tokens_computed"] == report.tokens_computed
    requests = 2 + len(PROMPTS)
    assert counters["seqs"] == requests * NEW_TOKENS  # a sequence a computed step
    assert counters["decode_seqs"] == requests * (NEW_TOKENS - 1)
    assert counters["decode_batches"] == 2 * (NEW_TOKENS - 1)  # the two calls' decode steps
    assert counters["batches"] - counters["decode_batches"] == 2  # their prefills
    # CPU by span (every span is CPU-timed now), inside the executor thread's, inside the
    # process's
    spans = {key: value for key, value in counters.items() if key.startswith("cpu:")}
    assert {"cpu:forward", "cpu:sample", "cpu:schedule", "cpu:handle"} <= set(spans), spans
    assert min(spans.values()) >= 0 and spans["cpu:forward"] > 0, spans
    assert report.busy_cpu_s["schedule"] == spans["cpu:schedule"]
    assert sum(spans.values()) <= counters["thread_cpu_s"] <= counters["process_cpu_s"]
    assert all(f"wall:{key[4:]}" in counters for key in spans)


def test_an_engine_built_in_a_thread_that_has_ended_still_reports():
    """The executor thread's CPU clock belongs to the thread that built the engine: once
    that thread has exited, the counters say 0 for it instead of raising (which, in the
    watchdog thread of a rank > 0, would abort the job; on rank 0, fail /metrics and
    shutdown)."""
    import threading

    built = []
    builder = threading.Thread(target=lambda: built.append(LLM(preset="tiny", max_batch_size=2)))
    builder.start()
    builder.join()
    llm = built[0]
    try:
        outputs = llm.generate([[256, 7, 8]], SamplingParams(max_tokens=3, temperature=0))
        assert len(outputs[0].token_ids) == 3
        counters = llm._engine.rank_counters()
        assert counters["thread_cpu_s"] == 0.0 and counters["process_cpu_s"] > 0
    finally:
        reports = llm.shutdown()
    assert reports[0].counters["thread_cpu_s"] == 0.0

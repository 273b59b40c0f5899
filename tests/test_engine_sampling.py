"""Sampling through the whole engine (PP=1, in process): seeds, chunked prefill, preemption.

A seeded request must give the same tokens whatever else is in the batch, however
its prompt is chunked, and whether or not it was preempted and recomputed.
"""

from __future__ import annotations

import numpy as np
import pytest

from ppruntime import LLM, SamplingParams

PROMPTS = ["hello", "once upon a time", "abc", "x", "pipeline parallel", "MPI"]
LONG_PROMPT = np.random.default_rng(1).integers(0, 256, 150).tolist()


def seeded(seed: int, max_tokens: int = 24, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.9, seed=seed, **kwargs)


def greedy(max_tokens: int = 24) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True)


def _tokens(llm, prompts, params) -> list[list[int]]:
    return [output.token_ids for output in llm.generate(prompts, params, use_tqdm=False)]


@pytest.fixture(scope="module")
def llm():
    engine = LLM(preset="tiny", deterministic=True, block_size=4)
    yield engine
    reports = engine.shutdown()
    assert reports[0].kv_blocks_free == reports[0].kv_blocks_total


# -- seeds -------------------------------------------------------------------------------
SEEDED_VARIANTS = {
    "plain": {},
    "top-k": {"top_k": 20},
    "top-p": {"top_p": 0.8},
    "min-p": {"min_p": 0.05},
    "all": {"top_k": 50, "top_p": 0.9, "min_p": 0.02, "logprobs": 2},
}


@pytest.mark.parametrize("variant", sorted(SEEDED_VARIANTS))
def test_seeded_request_is_reproducible_and_batch_independent(llm, variant):
    params = seeded(1234, **SEEDED_VARIANTS[variant])
    [alone] = _tokens(llm, ["hello"], params)
    assert _tokens(llm, ["hello"], params) == [alone], "not reproducible across runs"
    # in a crowd: other seeded, greedy, unseeded (global RNG) and filtered requests,
    # before and after it in the batch
    crowd = [
        seeded(1),
        greedy(),
        SamplingParams(max_tokens=30, temperature=1.3),
        params,
        SamplingParams(max_tokens=5, temperature=0.5, top_k=3),
        seeded(99, max_tokens=40, top_p=0.5),
    ]
    prompts = ["abc", "x", "once upon a time", "hello", "MPI", "pipeline parallel"]
    crowded = _tokens(llm, prompts, crowd)
    assert crowded[3] == alone
    # and again with itself several times in one batch
    assert _tokens(llm, ["hello"] * 3, params) == [alone] * 3


def test_seeded_reproducible_in_a_fresh_engine(llm):
    params = seeded(7, max_tokens=32)
    expected = _tokens(llm, PROMPTS, params)
    with LLM(preset="tiny", deterministic=False, block_size=16) as other:
        assert _tokens(other, PROMPTS, params) == expected


def test_different_seeds_differ(llm):
    outputs = _tokens(llm, ["hello"] * 4, [seeded(seed, max_tokens=32) for seed in range(4)])
    assert len({tuple(tokens) for tokens in outputs}) == 4


def test_seeded_sampling_actually_samples(llm):
    """Seeded output is not just the greedy output (temperature is applied)."""
    [sampled] = _tokens(llm, ["hello"], seeded(5, max_tokens=32))
    [argmax] = _tokens(llm, ["hello"], greedy(32))
    assert sampled != argmax


# -- chunked prefill ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "max_num_tokens,deterministic", [(16, True), (5, True), (7, False)], ids=["16", "5", "7-async"]
)
def test_chunked_prefill_gives_the_same_tokens(llm, max_num_tokens, deterministic):
    prompts = [LONG_PROMPT, "hello", LONG_PROMPT[:37], "abc"]
    params = [greedy(20), seeded(3), seeded(11, logprobs=1), greedy(10)]
    unchunked = llm.generate(prompts, params, use_tqdm=False)
    with LLM(
        preset="tiny",
        deterministic=deterministic,
        block_size=4,
        max_num_tokens=max_num_tokens,
        max_batch_size=4,
    ) as small:
        chunked = small.generate(prompts, params, use_tqdm=False)
        reports = small.shutdown()
    counters = reports[0].step_counters
    prefill_steps = counters["steps"] - counters["decode_steps"]
    assert prefill_steps >= len(LONG_PROMPT) // max_num_tokens, "the prompt was not chunked"
    for ours, reference in zip(chunked, unchunked):
        assert ours.token_ids == reference.token_ids
    np.testing.assert_allclose(
        [step[token] for step, token in zip(chunked[2].logprobs, chunked[2].token_ids)],
        [step[token] for step, token in zip(unchunked[2].logprobs, unchunked[2].token_ids)],
        atol=1e-4,
    )


# -- preemption --------------------------------------------------------------------------
PREEMPT_MODEL_LEN = 64
PREEMPT_BLOCK = 4


PREEMPT_PROMPTS = [*PROMPTS, "a much longer prompt here", "z"]
# 8 requests of 2..26 + 36 tokens: up to 16 blocks each, 16 blocks in all
PREEMPT_PARAMS = [
    greedy(36) if index % 2 == 0 else seeded(index, max_tokens=36, ignore_eos=True)
    for index in range(len(PREEMPT_PROMPTS))
]
PREEMPT_CONFIGS = {
    "deterministic": {"deterministic": True},
    "async": {"deterministic": False},
    "chunked": {"deterministic": True, "max_num_tokens": 8, "max_batch_size": 8},
    "streamed": {"deterministic": True},
}


@pytest.fixture(scope="module")
def unconstrained(llm):
    return llm.generate(PREEMPT_PROMPTS, PREEMPT_PARAMS, use_tqdm=False)


def _stream_whole(llm, prompts, params) -> dict[str, tuple[list[int], str | None]]:
    whole: dict[str, tuple[list[int], str | None]] = {}
    for delta in llm.generate_stream(prompts, params):
        tokens, _ = whole.get(delta.request_id, ([], None))
        whole[delta.request_id] = (tokens + delta.token_ids, delta.finish_reason)
    return whole


@pytest.mark.parametrize("config", sorted(PREEMPT_CONFIGS))
def test_preemption_under_tiny_kv_capacity_gives_the_same_tokens(unconstrained, config):
    just_one = -(-PREEMPT_MODEL_LEN // PREEMPT_BLOCK)  # blocks for one max-length request
    constrained = LLM(
        preset="tiny",
        block_size=PREEMPT_BLOCK,
        max_model_len=PREEMPT_MODEL_LEN,
        kv_cache_blocks=just_one,
        **PREEMPT_CONFIGS[config],
    )
    try:
        if config == "streamed":
            whole = _stream_whole(constrained, PREEMPT_PROMPTS, PREEMPT_PARAMS)
            assert len(whole) == len(PREEMPT_PROMPTS)
            results = [whole[request_id] for request_id in sorted(whole, key=lambda r: int(r[4:]))]
        else:
            outputs = constrained.generate(PREEMPT_PROMPTS, PREEMPT_PARAMS, use_tqdm=False)
            results = [(output.token_ids, output.finish_reason) for output in outputs]
        preemptions = constrained._executor.scheduler.num_preemptions
    finally:
        reports = constrained.shutdown()
    assert preemptions > 0, "the KV capacity never forced a preemption"
    report = reports[0]
    assert report.kv_blocks_total == just_one
    assert report.kv_blocks_free == report.kv_blocks_total
    # every preempted sequence rejoined with a fresh block-table row
    assert report.block_table_counters["row_writes"] > len(PREEMPT_PROMPTS)
    for (tokens, finish_reason), reference in zip(results, unconstrained):
        assert finish_reason == reference.finish_reason == "length"
        assert tokens == reference.token_ids
        assert len(tokens) == 36

"""Greedy generation (PP=1, in process) vs transformers' `generate`, for every architecture.

A batch of prompts of different lengths, given as token ids, runs through the whole
engine (scheduler, paged KV cache, pooled step inputs, sampler). Tokens are compared
the way vLLM's tests do (tests/reference_compare.py) and the log-probs of the chosen
tokens must equal log_softmax of transformers' raw logits.
"""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import ARCHITECTURES, load_reference_model, make_tiny_checkpoint
from reference_compare import (
    compare_greedy,
    compare_greedy_detailed,
    hf_greedy_reference,
)

from ppruntime import LLM, SamplingParams

MAX_NEW_TOKENS = 24
LOGPROB_TOLERANCE = 1e-4
# lengths 1, 5, 13, 29: single token, under / over one KV block of 4, past mistral's
# sliding window of 6, several chunks when max_num_tokens is small
PROMPTS = [
    [5],
    [10, 20, 30, 40, 50],
    list(range(3, 16)),
    np.random.default_rng(0).integers(3, 300, 29).tolist(),
]
GREEDY = SamplingParams(max_tokens=MAX_NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=1)


@pytest.fixture(scope="module")
def references(tmp_path_factory):
    """arch -> (checkpoint dir, GreedyReference of PROMPTS)."""
    built = {}
    for arch in ARCHITECTURES:
        directory = make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt"), arch)
        model = load_reference_model(directory)
        built[arch] = (directory, hf_greedy_reference(model, PROMPTS, MAX_NEW_TOKENS))
    return built


def _generate(directory, **engine_kwargs):
    llm = LLM(str(directory), block_size=4, **engine_kwargs)
    try:
        outputs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        reports = llm.shutdown()
    assert reports[0].kv_blocks_free == reports[0].kv_blocks_total
    return outputs


def _check_against_reference(outputs, reference) -> None:
    ours = [output.token_ids for output in outputs]
    comparison = compare_greedy_detailed(
        reference.tokens,
        reference.top2_logprobs,
        ours,
        reference_top2_ids=reference.top2_ids,
    )
    assert not comparison.mismatches, "\n".join(comparison.mismatches)
    for index, (output, compared) in enumerate(zip(outputs, comparison.compared)):
        assert output.prompt_token_ids == list(PROMPTS[index])
        assert output.finish_reason == "length"
        assert output.logprobs is not None and len(output.logprobs) == len(output.token_ids)
        chosen = np.array(
            [step[token] for step, token in zip(output.logprobs, output.token_ids)][:compared]
        )
        expected = reference.chosen_logprobs[index][:compared]
        np.testing.assert_allclose(
            chosen,
            expected,
            atol=LOGPROB_TOLERANCE,
            rtol=0,
            err_msg=f"log-probs of sequence {index}",
        )
        # logprobs=1: the chosen token plus the single best one (the same, greedy)
        for step, token in zip(output.logprobs[:compared], output.token_ids):
            assert set(step) == {token}


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_greedy_matches_transformers(references, arch):
    directory, reference = references[arch]
    outputs = _generate(directory, deterministic=True)
    _check_against_reference(outputs, reference)


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_greedy_matches_transformers_async_and_chunked(references, arch):
    """The default (relay-thread) mode with prompts prefilled in chunks of 7 tokens."""
    directory, reference = references[arch]
    outputs = _generate(directory, deterministic=False, max_num_tokens=7, max_batch_size=3)
    _check_against_reference(outputs, reference)


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_greedy_matches_transformers_with_async_scheduling(references, chunked):
    """Each step scheduled before the previous one's tokens are on the host (forced on
    the CPU): the reference's tokens, and the synchronous loop's, token for token."""
    directory, reference = references["llama"]
    sizes = {"max_num_tokens": 7, "max_batch_size": 3} if chunked else {}
    overlapped = _generate(directory, async_scheduling=True, **sizes)
    _check_against_reference(overlapped, reference)
    sync = _generate(directory, async_scheduling=False, **sizes)
    assert [o.token_ids for o in overlapped] == [o.token_ids for o in sync]


def test_reference_contains_eos_so_ignore_eos_matters(references):
    """The llama reference emits its eos (id 2) mid-sequence: ignore_eos is exercised."""
    _, reference = references["llama"]
    assert any(2 in tokens[:-1] for tokens in reference.tokens)


# -- the comparison helper itself ------------------------------------------------------
def _top2(gaps):
    return [np.array([[0.0, -gap] for gap in gaps])]


def test_compare_greedy_accepts_identical():
    assert compare_greedy([[1, 2, 3]], _top2([1, 1, 1]), [[1, 2, 3]]) == []


def test_compare_greedy_rejects_confident_mismatch():
    mismatches = compare_greedy([[1, 2, 3]], _top2([1, 1, 1]), [[1, 9, 3]])
    assert len(mismatches) == 1 and "step 1" in mismatches[0]


def test_compare_greedy_stops_at_near_tie():
    # step 1 is a near-tie: the divergence and everything after it is accepted
    comparison = compare_greedy_detailed([[1, 2, 3]], _top2([1, 0.001, 1]), [[1, 9, 7]])
    assert comparison.mismatches == [] and comparison.compared == [1]


def test_compare_greedy_near_tie_must_be_second_choice():
    ids = [np.array([[1, 4], [2, 9], [3, 5]])]
    ok = compare_greedy([[1, 2, 3]], _top2([1, 0.001, 1]), [[1, 9, 0]], reference_top2_ids=ids)
    bad = compare_greedy([[1, 2, 3]], _top2([1, 0.001, 1]), [[1, 8, 0]], reference_top2_ids=ids)
    assert ok == [] and len(bad) == 1


def test_compare_greedy_rejects_length_difference():
    assert compare_greedy([[1, 2, 3]], _top2([1, 1, 1]), [[1, 2]])
    assert compare_greedy([[1, 2]], _top2([1, 1]), [[1, 2], [3]])

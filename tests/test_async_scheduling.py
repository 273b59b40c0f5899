"""Async scheduling (PP=1, in process, CPU): the same outputs as the synchronous loop.

With async scheduling rank 0 schedules and launches step k+1 before step k's tokens
are on the host; a sequence continued that way takes its input token on the device.
On the CPU there is no overlap to gain, but the mechanism is the same, so every
output must equal the synchronous run's: tokens, text, finish and stop reasons,
log-probs, streamed deltas. Requests that end in step k (eos, stop ids, stop strings,
max_tokens, abort) while step k+1 already computed them must not gain its token, and
every KV block must come back.
"""

from __future__ import annotations

import numpy as np
import pytest
from model_fixtures import make_tiny_checkpoint

from ppruntime import LLM, SamplingParams
from ppruntime.config import ConfigError, EngineConfig, ParallelConfig

PROMPTS = ["hello", "once upon a time", "abc", "x"]
LONG = 40


def greedy(max_tokens: int = LONG, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, **kwargs)


def _engine(async_scheduling: bool, **kwargs) -> LLM:
    return LLM(
        preset="tiny", async_scheduling=async_scheduling, block_size=4, max_batch_size=8, **kwargs
    )


@pytest.fixture(scope="module")
def engines():
    """(synchronous, async) engines on the same tiny model."""
    sync, overlapped = _engine(False), _engine(True)
    yield sync, overlapped
    for llm in (sync, overlapped):
        reports = llm.shutdown()
        assert reports[0].kv_blocks_free == reports[0].kv_blocks_total
    assert reports[0].rows_continued > 0, "async scheduling never continued a sequence"


@pytest.fixture(scope="module")
def baseline(engines):
    """prompt -> unconstrained greedy output of the synchronous engine."""
    sync, _ = engines
    outputs = sync.generate(PROMPTS, greedy(ignore_eos=True), use_tqdm=False)
    return dict(zip(PROMPTS, outputs))


def _summary(output) -> tuple:
    return (output.token_ids, output.text, output.finish_reason, output.stop_reason, output.error)


def _same_logprobs(ours, reference) -> None:
    """Equal keys, values within float noise: a request that ended in step k stays in
    step k+1's batch (its row discarded), and a different batch may round differently."""
    assert (ours.logprobs is None) == (reference.logprobs is None)
    for mine, theirs in zip(ours.logprobs or [], reference.logprobs or []):
        assert mine.keys() == theirs.keys()
        np.testing.assert_allclose(list(mine.values()), list(theirs.values()), atol=1e-4)


def _both(engines, prompts, params) -> tuple[list, list]:
    sync, overlapped = engines
    expected = sync.generate(prompts, params, use_tqdm=False)
    before = overlapped._executor.stats.rows_continued
    got = overlapped.generate(prompts, params, use_tqdm=False)
    assert overlapped._executor.stats.rows_continued > before, "nothing was continued"
    assert overlapped._executor.table.all_blocks_free()
    assert not overlapped._executor.table.num_in_flight_batches
    return expected, got


def _check_same(expected, got) -> None:
    for ours, reference in zip(got, expected):
        assert _summary(ours) == _summary(reference), ours.request_id
        _same_logprobs(ours, reference)


def test_greedy_tokens_and_logprobs_equal_the_synchronous_loop(engines):
    _check_same(*_both(engines, PROMPTS, greedy(ignore_eos=True, logprobs=3)))


@pytest.mark.parametrize("step", [0, 1, 2, 7])
def test_stop_token_id_mid_flight(engines, baseline, step):
    """Each request stops at its own step; later steps were already continued."""
    params = [greedy(stop_token_ids=[baseline[p].token_ids[step]]) for p in PROMPTS]
    expected, got = _both(engines, PROMPTS, params)
    _check_same(expected, got)
    for output, prompt in zip(got, PROMPTS):
        full = baseline[prompt].token_ids
        cut = full.index(full[step]) + 1
        assert output.token_ids == full[:cut] and output.finish_reason == "stop"


def test_stop_strings_mid_flight(engines, baseline):
    params = []
    for prompt in PROMPTS:
        text = baseline[prompt].text
        params.append(greedy(stop=[text[5:7]] if len(text) > 8 else ["\u2603"]))
    expected, got = _both(engines, PROMPTS, params)
    _check_same(expected, got)
    assert any(output.finish_reason == "stop" for output in got)


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 17])
def test_max_tokens_mid_flight(engines, baseline, max_tokens):
    expected, got = (
        _both(engines, PROMPTS, greedy(max_tokens, ignore_eos=True))
        if max_tokens > 1
        else (
            engines[0].generate(PROMPTS, greedy(1, ignore_eos=True), use_tqdm=False),
            engines[1].generate(PROMPTS, greedy(1, ignore_eos=True), use_tqdm=False),
        )
    )
    _check_same(expected, got)
    for output, prompt in zip(got, PROMPTS):
        assert output.token_ids == baseline[prompt].token_ids[:max_tokens]
        assert output.finish_reason == "length"


def test_mixed_endings_in_one_batch(engines, baseline):
    """Requests ending in different steps and ways, with new ones admitted meanwhile."""
    hello = baseline["hello"]
    params = [
        greedy(3, ignore_eos=True),
        greedy(stop_token_ids=[baseline["once upon a time"].token_ids[4]]),
        greedy(stop=[baseline["abc"].text[6:8]]),
        greedy(25, ignore_eos=True, logprobs=2),
        greedy(stop_token_ids=[hello.token_ids[10]], logprobs=1),
        SamplingParams(max_tokens=12, temperature=0.8, seed=5),
    ]
    prompts = [*PROMPTS, "hello", "pipeline"]
    _check_same(*_both(engines, prompts, params))


def test_eos_mid_flight(tmp_path):
    """The tiny llama checkpoint emits its eos (id 2) mid-sequence."""
    directory = make_tiny_checkpoint(tmp_path, "llama")
    prompts = [[5], list(range(3, 16)), [10, 20, 30, 40, 50]]
    results = {}
    for flag in (False, True):
        with LLM(str(directory), async_scheduling=flag, block_size=4) as llm:
            unconstrained = llm.generate(prompts, greedy(32, ignore_eos=True), use_tqdm=False)
            stopped = llm.generate(prompts, greedy(32), use_tqdm=False)
            continued = llm._executor.stats.rows_continued
            reports = llm.shutdown()
        assert reports[0].kv_blocks_free == reports[0].kv_blocks_total
        results[flag] = [_summary(o) for o in unconstrained + stopped]
        assert (continued > 0) == flag
    assert results[True] == results[False]
    stopped_early = [s for s in results[True][3:] if s[2] == "stop"]
    assert stopped_early and all(s[0][-1] == 2 and len(s[0]) < 32 for s in stopped_early)


SEEDED = {
    "plain": {},
    "filters": {"top_k": 20, "top_p": 0.9, "min_p": 0.02},
    "logprobs": {"top_k": 50, "logprobs": 2},
}


@pytest.mark.parametrize("variant", sorted(SEEDED))
def test_seeded_sampling_equals_the_synchronous_loop(engines, variant):
    params = [
        SamplingParams(max_tokens=20, temperature=0.9, seed=seed, **SEEDED[variant])
        for seed in (1, 2, 3, 4)
    ]
    _check_same(*_both(engines, PROMPTS, params))


def _collect_stream(llm, prompts, params) -> dict[str, tuple]:
    pieces: dict[str, list] = {}
    for delta in llm.generate_stream(prompts, params):
        tokens, text, ends = pieces.setdefault(delta.request_id, [[], "", []])
        tokens += delta.token_ids
        pieces[delta.request_id][1] = text + delta.text
        if delta.finished:
            ends.append(delta.finish_reason)
    return {key: (value[0], value[1], value[2]) for key, value in pieces.items()}


def test_streamed_deltas_equal_the_synchronous_loop(engines, baseline):
    sync, overlapped = engines
    stop = baseline["hello"].text[4:6]
    params = [greedy(20, stop=[stop]), greedy(9, ignore_eos=True), greedy(logprobs=1), greedy(2)]
    expected = _collect_stream(sync, PROMPTS, params)
    got = _collect_stream(overlapped, PROMPTS, params)
    assert [value for _, value in sorted(got.items())] == [
        value for _, value in sorted(expected.items())
    ]
    for _, _, ends in got.values():
        assert len(ends) == 1, "exactly one final delta per request"
    assert overlapped._executor.table.all_blocks_free()


def _step_until(llm, wanted: set[str], finished: dict) -> None:
    for _ in range(10_000):
        if wanted <= finished.keys():
            return
        done, _ = llm.step()
        for output in done:
            finished[output.request_id] = output
    raise AssertionError(f"requests never finished: {sorted(wanted - finished.keys())}")


@pytest.mark.parametrize("steps_before_abort", [3, 4, 7])
def test_abort_mid_decode_frees_every_block(engines, baseline, steps_before_abort):
    _, llm = engines
    params = greedy(ignore_eos=True)
    finished: dict = {}
    keep = [llm.add_request(prompt, params) for prompt in ("hello", "abc")]
    victim = llm.add_request("once upon a time", params)
    for _ in range(steps_before_abort):
        done, _ = llm.step()
        for output in done:
            finished[output.request_id] = output
    table = llm._executor.table
    assert table.steps_in_flight.max() >= 1, "nothing in flight at the abort"
    assert llm.abort(victim)
    _step_until(llm, {*keep, victim}, finished)
    assert table.all_blocks_free() and not table.num_in_flight_batches
    assert not table.active.any() and not table.num_awaiting_release
    aborted = finished[victim]
    full = baseline["once upon a time"].token_ids
    assert aborted.finish_reason == "abort"
    assert 0 < len(aborted.token_ids) < len(full)
    assert aborted.token_ids == full[: len(aborted.token_ids)]
    for request_id, prompt in zip(keep, ("hello", "abc")):
        assert finished[request_id].token_ids == baseline[prompt].token_ids


def test_preemption_under_tiny_kv_capacity(baseline):
    """KV blocks so few that sequences are preempted and recomputed while others run
    continued; the tokens are still the synchronous loop's."""
    prompts = [*PROMPTS, "a much longer prompt here", "z"]
    params = [
        greedy(30, ignore_eos=True)
        if index % 2 == 0
        else SamplingParams(max_tokens=30, temperature=0.9, seed=index, ignore_eos=True)
        for index in range(len(prompts))
    ]
    results = {}
    for flag in (False, True):
        with LLM(
            preset="tiny",
            async_scheduling=flag,
            block_size=4,
            max_model_len=64,
            kv_cache_blocks=16,
        ) as llm:
            outputs = llm.generate(prompts, params, use_tqdm=False)
            preemptions = llm._executor.scheduler.num_preemptions
            continued = llm._executor.stats.rows_continued
            reports = llm.shutdown()
        assert reports[0].kv_blocks_free == reports[0].kv_blocks_total
        assert preemptions > 0, "the KV capacity never forced a preemption"
        assert (continued > 0) == flag
        results[flag] = [_summary(o) for o in outputs]
    assert results[True] == results[False]


def test_model_length_limit_is_known_ahead():
    """A sequence that reaches max_model_len is never continued past it."""
    results = {}
    prompts = ["hello", "abc", "x"]
    for flag in (False, True):
        with LLM(preset="tiny", async_scheduling=flag, block_size=4, max_model_len=12) as llm:
            room = [12 - len(llm.encode_prompt(prompt)) for prompt in prompts]
            params = [greedy(tokens, ignore_eos=True) for tokens in room]
            outputs = llm.generate(prompts, params, use_tqdm=False)
            reports = llm.shutdown()
        assert reports[0].kv_blocks_free == reports[0].kv_blocks_total
        results[flag] = [_summary(o) for o in outputs]
        for output in outputs:
            assert len(output.prompt_token_ids) + len(output.token_ids) == 12
    assert results[True] == results[False]


# -- configuration ----------------------------------------------------------------------
def test_default_is_on_for_cuda_at_one_stage_only():
    assert EngineConfig().async_scheduling_on("cuda")
    assert not EngineConfig().async_scheduling_on("cpu")
    two_stages = EngineConfig(parallel=ParallelConfig(pp_size=2))
    assert not two_stages.async_scheduling_on("cuda")
    deterministic = EngineConfig(parallel=ParallelConfig(deterministic=True))
    assert not deterministic.async_scheduling_on("cuda")
    assert EngineConfig(async_scheduling=True).async_scheduling_on("cpu")
    assert not EngineConfig(async_scheduling=False).async_scheduling_on("cuda")


def test_explicit_request_with_several_stages_is_an_error():
    with pytest.raises(ConfigError, match="needs pp_size 1, got pp_size=2.*drop --async"):
        EngineConfig(async_scheduling=True, parallel=ParallelConfig(pp_size=2))
    EngineConfig(async_scheduling=False, parallel=ParallelConfig(pp_size=2))  # fine


def test_explicit_request_in_deterministic_mode_is_an_error():
    with pytest.raises(ConfigError, match="deterministic mode"):
        EngineConfig(async_scheduling=True, parallel=ParallelConfig(deterministic=True))
    with pytest.raises(ConfigError, match="async_scheduling must be True, False or None"):
        EngineConfig(async_scheduling="yes")


def test_cli_flags():
    from ppruntime.cli import build_parser

    parser = build_parser()
    assert parser.parse_args(["generate"]).async_scheduling is None
    assert parser.parse_args(["generate", "--async-scheduling"]).async_scheduling is True
    assert parser.parse_args(["generate", "--no-async-scheduling"]).async_scheduling is False


def test_cli_refuses_async_scheduling_with_several_stages():
    import subprocess
    import sys

    command = [sys.executable, "-m", "ppruntime", "generate", "--preset", "tiny"]
    command += ["--pp-size", "2", "--async-scheduling", "--prompt", "hi"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert "async scheduling (--async-scheduling) needs pp_size 1, got pp_size=2" in result.stderr
    assert "drop --async-scheduling" in result.stderr

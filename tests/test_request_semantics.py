"""What a request's parameters promise, checked by value (PP=1, in process, tiny preset).

- every row of a mixed batch (greedy, top-k, top-p, min-p, seeds, log-probs) gives what
  that request gives alone;
- extreme valid values mean what they say: top_k beyond the vocabulary is no top-k,
  min_p=1 is greedy, logprobs=N gives N entries per token, the engine seed decides
  the draws of unseeded requests;
- after SIGTERM (the flag its handler sets) running requests end "abort" with their
  tokens and new requests are refused;
- microbatch slot counts per mode.
"""

from __future__ import annotations

import pytest

from ppruntime import LLM, SamplingParams
from ppruntime.comm.failure import termination_requested
from ppruntime.config import MIN_ASYNC_MICROBATCHES, ParallelConfig

VOCAB = 512  # the tiny preset's
MAX_TOKENS = 16


def greedy(**kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, **kwargs)


def seeded(seed: int, temperature: float = 1.0, **kwargs) -> SamplingParams:
    return SamplingParams(
        max_tokens=MAX_TOKENS, temperature=temperature, seed=seed, ignore_eos=True, **kwargs
    )


@pytest.fixture(scope="module")
def llm():
    engine = LLM(preset="tiny", deterministic=True, block_size=4)
    yield engine
    reports = engine.shutdown()
    assert reports[0].kv_blocks_free == reports[0].kv_blocks_total


def _run(llm, prompts, params) -> list:
    return llm.generate(prompts, params, use_tqdm=False)


# -- batch independence -------------------------------------------------------------------
MIXED = [
    ("hello", greedy()),
    ("once upon a time", greedy(logprobs=3)),
    ("abc", seeded(11, temperature=2.5, top_k=3)),
    ("x", seeded(12, temperature=1.5, top_p=0.7, logprobs=2)),
    ("pipeline parallel", seeded(13, temperature=3.0, min_p=0.2)),
    ("MPI", seeded(14, temperature=1.3, top_k=40, top_p=0.9, min_p=0.05, logprobs=1)),
    ("hello", seeded(15, temperature=1.5)),
    ("abc", SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_k=3, ignore_eos=True)),
    ("x", greedy(logprobs=0)),
]


def test_every_row_of_a_mixed_batch_equals_the_request_alone(llm):
    prompts = [prompt for prompt, _ in MIXED]
    params = [p for _, p in MIXED]
    batched = _run(llm, prompts, params)
    reversed_batch = _run(llm, prompts[::-1], params[::-1])[::-1]
    compared = 0
    for index, (prompt, p) in enumerate(MIXED):
        if not p.is_greedy and p.seed is None:
            continue  # unseeded: its draws depend on its arrival (engine seed + id)
        [alone] = _run(llm, [prompt], [p])
        for name, output in (("batch", batched[index]), ("reversed", reversed_batch[index])):
            what = f"row {index} ({p}) in the {name}"
            assert len(alone.token_ids) == MAX_TOKENS
            assert output.token_ids == alone.token_ids, what
            if p.logprobs is not None:
                # other batch shapes round the matmuls differently: float32 tolerance
                assert [sorted(step) for step in output.logprobs] == [
                    sorted(step) for step in alone.logprobs
                ], what
                for got, want in zip(output.logprobs, alone.logprobs):
                    for token, value in want.items():
                        assert got[token] == pytest.approx(value, abs=1e-4), what
        compared += 1
    assert compared == len(MIXED) - 1
    # the seeded rows did sample: not all of them are the greedy tokens
    greedy_tokens = [o.token_ids for o in _run(llm, prompts[2:7], [greedy()] * 5)]
    assert sum(a.token_ids != b for a, b in zip(batched[2:7], greedy_tokens)) >= 3


# -- extreme valid values -----------------------------------------------------------------
@pytest.mark.parametrize("top_k", [VOCAB, VOCAB + 1, 10**6])
def test_top_k_at_or_beyond_the_vocabulary_is_no_top_k(llm, top_k):
    prompts = ["hello", "abc"]
    base = _run(llm, prompts, [seeded(21), seeded(22, top_k=7)])
    # the second row keeps a real top-k beside the row whose top_k is beyond V
    wide = _run(llm, prompts, [seeded(21, top_k=top_k), seeded(22, top_k=7)])
    assert [o.token_ids for o in wide] == [o.token_ids for o in base]


def test_min_p_one_is_greedy(llm):
    prompts = ["hello", "once upon a time", "MPI"]
    argmax = _run(llm, prompts, [greedy()] * 3)
    for temperature in (0.7, 1.0, 2.0):
        params = [seeded(30 + i, temperature=temperature, min_p=1.0) for i in range(3)]
        outputs = _run(llm, prompts, params)
        assert [o.token_ids for o in outputs] == [o.token_ids for o in argmax], temperature
    # and not by accident: the same seeds without min_p sample something else
    free = _run(llm, prompts, [seeded(30 + i, temperature=2.0) for i in range(3)])
    assert [o.token_ids for o in free] != [o.token_ids for o in argmax]


def test_logprobs_n_gives_n_entries_per_token(llm):
    counts = [0, 1, 2, 5, 20]
    prompts = ["hello"] * len(counts) * 2
    params = [greedy(logprobs=n) for n in counts]
    params += [seeded(40 + n, temperature=1.5, logprobs=n) for n in counts]
    outputs = _run(llm, prompts, params)
    for output, p in zip(outputs, params):
        n = p.logprobs
        assert len(output.logprobs) == len(output.token_ids) == MAX_TOKENS
        for step, token in zip(output.logprobs, output.token_ids):
            assert token in step, (n, step)
            others = {t: v for t, v in step.items() if t != token}
            if p.is_greedy:  # the chosen token is the best one: exactly N entries
                assert len(step) == max(n, 1), (n, step)
                assert step[token] == max(step.values())
            else:  # the top N, plus the sampled token when it is not among them
                assert len(step) in (max(n, 1), n + 1), (n, step)
                assert len(others) in (n - 1, n) if n else len(others) == 0
    # entries are the top-N of one distribution: a larger N extends a smaller one
    greedy_steps = [outputs[i].logprobs for i in range(len(counts))]
    for small, large in zip(greedy_steps, greedy_steps[1:]):
        for a, b in zip(small, large):
            assert set(a) <= set(b)
            assert min(b.values()) <= min(a.values())


def _unseeded_tokens(seed: int) -> list[list[int]]:
    params = [
        SamplingParams(max_tokens=MAX_TOKENS, temperature=1.2, ignore_eos=True),
        SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, top_p=0.9, ignore_eos=True),
    ]
    with LLM(preset="tiny", deterministic=True, block_size=4, seed=seed) as engine:
        return [o.token_ids for o in _run(engine, ["hello", "abc"], params)]


def test_engine_seed_decides_the_draws_of_unseeded_requests():
    first, again, other = _unseeded_tokens(5), _unseeded_tokens(5), _unseeded_tokens(6)
    assert first == again, "the same engine seed gave different draws"
    assert first[0] != other[0] and first[1] != other[1], "another engine seed, same draws"


# -- SIGTERM: what the handler's flag does to the engine ---------------------------------
def test_after_sigterm_running_requests_abort_with_their_tokens_and_new_ones_are_refused():
    long = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)
    with LLM(preset="tiny", deterministic=True, block_size=4) as engine:
        ids = [engine.add_request(prompt, long) for prompt in ("hello", "abc", "x")]
        tokens = dict.fromkeys(ids, 0)
        finished = {}
        while min(tokens.values()) < 3:
            done, _ = engine.step()
            finished.update((o.request_id, o) for o in done)
            for request_id in ids:
                if request_id not in finished:
                    executor = engine._executor
                    seq = executor.infos[executor.requests.seq_id_of(request_id)]
                    tokens[request_id] = int(executor.table.num_output[seq.slot])
        assert not finished
        termination_requested.set()  # what the SIGTERM handler does
        try:
            with pytest.raises(RuntimeError, match="SIGTERM"):
                engine.add_request("new", long)
            for _ in range(100):
                done, _ = engine.step()
                finished.update((o.request_id, o) for o in done)
                if len(finished) == 3:
                    break
        finally:
            termination_requested.clear()
        reports = engine.shutdown()
    assert sorted(finished) == sorted(ids)
    assert {o.finish_reason for o in finished.values()} == {"abort"}
    for request_id in ids:
        assert tokens[request_id] <= len(finished[request_id].token_ids) < 400
    assert reports[0].kv_blocks_free == reports[0].kv_blocks_total


# -- microbatch slots ---------------------------------------------------------------------
@pytest.mark.parametrize(
    ("pp_size", "deterministic", "slots"),
    [(1, True, 1), (3, True, 3), (2, False, MIN_ASYNC_MICROBATCHES), (6, False, 6)],
)
def test_microbatch_slot_counts_per_mode(pp_size, deterministic, slots):
    config = ParallelConfig(pp_size=pp_size, deterministic=deterministic)
    assert config.microbatch_slots == slots
    assert ParallelConfig(pp_size=pp_size, num_microbatches=pp_size + 2).microbatch_slots == (
        pp_size + 2
    )


def test_engine_uses_the_configured_slots(llm):
    assert len(llm._executor.slots) == 1  # deterministic, PP=1
    with LLM(preset="tiny", deterministic=False) as engine:
        assert len(engine._executor.slots) == MIN_ASYNC_MICROBATCHES

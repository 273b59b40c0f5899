import numpy as np
import pytest
import torch

from ppruntime.stage.sampler import (
    SAMPLING_EPS,
    Sampler,
    SamplingBatch,
    make_generator,
    nonfinite_rows,
)

VOCAB = 50


def make_batch(
    n, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seeds=None, num_logprobs=0
) -> SamplingBatch:
    def column(value, dtype):
        return np.broadcast_to(np.asarray(value, dtype=dtype), (n,)).copy()

    temps = column(temperature, np.float32)
    if seeds is None:
        seeds = [None if t == 0 else 1000 + i for i, t in enumerate(temps)]
    generators = [None if s is None else make_generator(s) for s in seeds]
    return SamplingBatch(
        temperature=temps,
        top_k=column(top_k, np.int32),
        top_p=column(top_p, np.float32),
        min_p=column(min_p, np.float32),
        generators=generators,
        num_logprobs=num_logprobs,
    )


def random_logits(n, vocab=VOCAB, seed=0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=make_generator(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(6)
    result = Sampler().sample(logits, make_batch(6, temperature=0.0))
    assert result.token_ids.dtype == np.int32 and result.token_ids.shape == (6,)
    np.testing.assert_array_equal(result.token_ids, logits.argmax(-1).numpy())
    assert result.logprobs is None and result.top_token_ids is None


def test_greedy_ties_take_lowest_index():
    logits = torch.zeros(2, 8)
    logits[0, [3, 5]] = 2.0
    logits[1, [1, 6]] = 2.0
    batch = make_batch(2, temperature=[0.0, 0.0])
    np.testing.assert_array_equal(Sampler().sample(logits, batch).token_ids, [3, 1])


def test_greedy_rows_in_mixed_batch_are_argmax():
    logits = random_logits(4)
    batch = make_batch(4, temperature=[0.0, 1.0, 0.0, 0.7])
    tokens = Sampler().sample(logits, batch).token_ids
    argmax = logits.argmax(-1).numpy()
    assert tokens[0] == argmax[0] and tokens[2] == argmax[2]


def draw_sequence(logits_per_step, batch_factory, row):
    batch = batch_factory()
    sampler = Sampler()
    return [int(sampler.sample(logits, batch).token_ids[row]) for logits in logits_per_step]


def test_seeded_request_independent_of_batch():
    steps = [random_logits(5, seed=s) for s in range(6)]
    # Row 0 of every step alone, with seed 42.
    alone = draw_sequence(
        [logits[:1] for logits in steps],
        lambda: make_batch(1, temperature=0.8, top_k=20, top_p=0.9, seeds=[42]),
        row=0,
    )

    # Same logits row placed at index 2 of a batch with other seeds and greedy rows.
    def mixed_step(logits):
        return logits[[1, 3, 0, 4, 2]]

    mixed = draw_sequence(
        [mixed_step(logits) for logits in steps],
        lambda: make_batch(
            5,
            temperature=[0.0, 1.3, 0.8, 0.0, 1.0],
            top_k=[0, 5, 20, 0, 0],
            top_p=[1.0, 1.0, 0.9, 1.0, 0.5],
            min_p=[0.0, 0.1, 0.0, 0.0, 0.2],
            seeds=[None, 7, 42, None, 9],
        ),
        row=2,
    )
    assert alone == mixed


def test_same_seed_same_tokens_different_seed_differs():
    logits = torch.zeros(1, 1000)
    runs = [
        [int(Sampler().sample(logits, batch).token_ids[0]) for _ in range(5)]
        for batch in (make_batch(1, seeds=[s]) for s in (5, 5, 6))
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_top_k_one_equals_greedy():
    logits = random_logits(8)
    result = Sampler().sample(logits, make_batch(8, temperature=1.5, top_k=1))
    np.testing.assert_array_equal(result.token_ids, logits.argmax(-1).numpy())


def test_tiny_top_p_equals_greedy():
    logits = random_logits(8)
    result = Sampler().sample(logits, make_batch(8, temperature=2.0, top_p=1e-6))
    np.testing.assert_array_equal(result.token_ids, logits.argmax(-1).numpy())


def test_min_p_one_keeps_only_max():
    logits = random_logits(8)
    result = Sampler().sample(logits, make_batch(8, temperature=3.0, min_p=1.0))
    np.testing.assert_array_equal(result.token_ids, logits.argmax(-1).numpy())


def test_top_k_restricts_support():
    logits = random_logits(1, vocab=20)
    allowed = set(logits[0].topk(3).indices.tolist())
    batch = make_batch(1, temperature=5.0, top_k=3)
    sampler = Sampler()
    seen = {int(sampler.sample(logits, batch).token_ids[0]) for _ in range(200)}
    assert seen <= allowed and len(seen) > 1


def test_top_p_restricts_support():
    # probs 0.5, 0.3, 0.2 (then ~0): top_p=0.7 keeps the first two tokens.
    probs = torch.tensor([[0.5, 0.3, 0.2] + [1e-9] * 5])
    batch = make_batch(1, top_p=0.7)
    sampler = Sampler()
    seen = {int(sampler.sample(probs.log(), batch).token_ids[0]) for _ in range(300)}
    assert seen == {0, 1}


def test_two_token_distribution():
    p_one = 0.3
    logits = torch.tensor([[np.log(1 - p_one), np.log(p_one)]], dtype=torch.float32)
    batch = make_batch(1, seeds=[123])
    sampler = Sampler()
    draws = 2000
    ones = sum(int(sampler.sample(logits, batch).token_ids[0]) for _ in range(draws))
    # std of the count is sqrt(2000 * 0.21) ~ 20.5; allow ~5 sigma
    assert abs(ones - p_one * draws) < 100


def test_temperature_sharpens_distribution():
    logits = torch.tensor([[0.0, 1.0]])
    sampler = Sampler()
    batch = make_batch(1, temperature=0.1, seeds=[3])
    ones = sum(int(sampler.sample(logits, batch).token_ids[0]) for _ in range(300))
    assert ones > 290  # p(1) = sigmoid(10) ~ 0.99995


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_raw_log_softmax(temperature):
    logits = random_logits(4)
    result = Sampler().sample(
        logits, make_batch(4, temperature=temperature, top_k=5, num_logprobs=3)
    )
    expected = torch.log_softmax(logits, dim=-1)
    chosen = expected.gather(1, torch.from_numpy(result.token_ids).long().unsqueeze(1))
    np.testing.assert_allclose(result.logprobs, chosen.squeeze(1).numpy(), rtol=1e-6)
    assert result.logprobs.dtype == np.float32
    assert result.top_token_ids.shape == (4, 3) and result.top_token_ids.dtype == np.int32
    assert result.top_logprobs.shape == (4, 3) and result.top_logprobs.dtype == np.float32
    assert (np.diff(result.top_logprobs, axis=1) <= 0).all()
    top = expected.topk(3, dim=-1)
    np.testing.assert_array_equal(result.top_token_ids, top.indices.numpy())
    np.testing.assert_allclose(result.top_logprobs, top.values.numpy(), rtol=1e-6)


def test_logprobs_with_all_rows_masked_except_one():
    logits = torch.tensor([[0.0, 5.0, -100.0]])
    result = Sampler().sample(logits, make_batch(1, top_k=1, num_logprobs=1))
    assert result.token_ids[0] == 1
    assert np.isfinite(result.logprobs).all()


def test_empty_batch():
    result = Sampler().sample(torch.zeros(0, VOCAB), make_batch(0, num_logprobs=2))
    assert result.token_ids.shape == (0,)


def test_empty_batch_with_logprobs_has_empty_arrays():
    result = Sampler().sample(torch.zeros(0, VOCAB), make_batch(0, num_logprobs=2))
    assert result.logprobs.shape == (0,) and result.top_token_ids.shape == (0, 2)


def test_row_without_generator_uses_global_rng():
    logits = random_logits(2)
    batch = make_batch(2, temperature=[1.0, 0.0], seeds=[None, None])
    tokens = Sampler().sample(logits, batch).token_ids
    assert 0 <= tokens[0] < VOCAB and tokens[1] == logits[1].argmax()


@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 1e-6, 9.9e-6])
def test_temperature_below_eps_is_greedy(temperature):
    """Dividing by such a temperature overflows float32 (every logit turns inf, softmax
    NaN): the row is greedy instead, and consumes no randomness."""
    logits = random_logits(5)
    batch = make_batch(5, temperature=temperature)
    result = Sampler().sample(logits, batch)
    np.testing.assert_array_equal(result.token_ids, logits.argmax(-1).numpy())
    assert result.nonfinite is None
    untouched = make_generator(1000)
    assert torch.equal(batch.generators[0].get_state(), untouched.get_state())


def test_temperature_at_eps_is_sampled():
    logits = torch.zeros(1, VOCAB)  # uniform: sampling picks all sorts of tokens
    tokens = {
        int(
            Sampler()
            .sample(logits, make_batch(1, temperature=SAMPLING_EPS, seeds=[s]))
            .token_ids[0]
        )
        for s in range(20)
    }
    assert len(tokens) > 1


def _poisoned_logits() -> torch.Tensor:
    logits = random_logits(6)
    logits[1, 7] = float("nan")
    logits[3, 2] = float("inf")
    logits[4] = -float("inf")  # no finite logit at all
    logits[5, 0] = -float("inf")  # rules token 0 out: harmless
    return logits


POISONED_ROWS = [False, True, False, True, True, False]


@pytest.mark.parametrize(
    "temperature, num_logprobs",
    [(0.0, 0), (0.0, 2), (0.8, 0), ([0.0, 0.9, 0.0, 0.5, 1.0, 0.0], 1)],
)
def test_nonfinite_rows_are_flagged(temperature, num_logprobs):
    logits = _poisoned_logits()
    result = Sampler().sample(logits, make_batch(6, temperature, num_logprobs=num_logprobs))
    assert result.nonfinite is not None
    assert result.nonfinite.tolist() == POISONED_ROWS
    fine = ~np.asarray(POISONED_ROWS)
    if num_logprobs:
        assert np.isfinite(result.logprobs[fine]).all()


def test_nonfinite_rows_none_when_all_finite():
    logits = random_logits(4)
    logits[2, :10] = -float("inf")
    assert nonfinite_rows(logits) is None
    assert nonfinite_rows(logits, logits.argmax(-1).numpy().astype(np.int32)) is None
    assert Sampler().sample(logits, make_batch(4, temperature=0.7)).nonfinite is None


def test_nonfinite_rows_greedy_shortcut_agrees_with_the_reduction():
    logits = _poisoned_logits()
    argmax = np.argmax(logits.numpy(), axis=-1).astype(np.int32)
    assert nonfinite_rows(logits, argmax).tolist() == nonfinite_rows(logits).tolist()

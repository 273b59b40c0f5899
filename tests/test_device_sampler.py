"""The device sampler against the reference sampler (ppruntime.stage.sampler).

On the CPU the Triton kernel runs interpreted (TRITON_INTERPRET=1, tiny shapes) and
must draw the very noise bits of the torch reference; the masks, the log-probs and the
distribution of the draws are checked against the reference sampler's math. The same
tests run on CUDA tensors (compiled kernel) when a GPU is there, and skip without one.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is first imported

import numpy as np
import pytest

from ppruntime.stage import sampler as reference
from ppruntime.stage.device_sampler import (
    DeviceSample,
    DeviceSampler,
    SamplingRows,
    gumbel_noise,
    row_keys,
    sampling_scores,
    seed_key,
    torch_gumbel_argmax,
)

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False

DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    ),
]
# the Triton kernel itself: interpreted on CPU tensors without a GPU, compiled with one
KERNEL_DEVICES = ["cuda"] if torch.cuda.is_available() else ["cpu"]
needs_triton = pytest.mark.skipif(not HAVE_TRITON, reason="needs the triton package")
VOCAB = 40


def make_rows(
    n,
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    min_p=0.0,
    seeds=None,
    positions=None,
    num_logprobs=0,
) -> SamplingRows:
    def column(value, dtype):
        return np.broadcast_to(np.asarray(value, dtype=dtype), (n,)).copy()

    seeds = np.arange(n) + 1000 if seeds is None else seeds
    positions = np.zeros(n) if positions is None else positions
    return SamplingRows(
        temperature=column(temperature, np.float32),
        top_k=column(top_k, np.int32),
        top_p=column(top_p, np.float32),
        min_p=column(min_p, np.float32),
        seeds=np.asarray([seed_key(int(seed)) for seed in seeds], dtype=np.uint64),
        positions=column(positions, np.int64),
        num_logprobs=num_logprobs,
    )


def random_logits(n, vocab=VOCAB, seed=0, device="cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, vocab, generator=generator) * 3).to(device)


def reference_probs(logits: torch.Tensor, rows: SamplingRows) -> torch.Tensor:
    """The reference sampler's filtered, renormalised probabilities of sampled rows."""
    logits = logits.cpu()
    scaled = logits / torch.from_numpy(rows.temperature).unsqueeze(1)
    scaled = reference._apply_top_k(scaled, rows.top_k)
    scaled = reference._apply_top_p(scaled, rows.top_p)
    probs = reference._apply_min_p(scaled.softmax(dim=-1), rows.min_p)
    return probs / probs.sum(dim=-1, keepdim=True)


def sampler_for(device: str, noise: str) -> DeviceSampler:
    if noise == "triton" and not HAVE_TRITON:
        pytest.skip("needs the triton package")
    if noise == "triton" and device == "cpu" and torch.cuda.is_available():
        pytest.skip("compiled Triton reads CUDA tensors only (the CPU case runs interpreted "
                    "on machines without a GPU, as CI's)")  # fmt: skip
    return DeviceSampler(noise=noise)


# -- the noise: the kernel draws the reference's bits -------------------------------------
def test_seed_keys_cover_every_int_seed():
    keys = [seed_key(seed) for seed in (0, 1, -1, 2**63, 2**70 + 5, -(2**40))]
    assert all(0 <= key < 2**64 for key in keys)
    assert len(set(keys)) == len(keys)


def test_row_keys_depend_on_seed_and_position():
    seeds = np.asarray([seed_key(s) for s in (1, 1, 2, 2**40 + 1)], dtype=np.uint64)
    key_a, key_b = row_keys(seeds, np.asarray([0, 1, 0, 0]))
    pairs = set(zip(key_a.tolist(), key_b.tolist()))
    assert len(pairs) == 4  # position, low and high seed bits all change the keys
    assert ((key_a >= 0) & (key_a < 2**32) & (key_b >= 0) & (key_b < 2**32)).all()


def test_noise_is_standard_gumbel():
    key_a, key_b = (
        torch.from_numpy(k) for k in row_keys(np.arange(8, dtype=np.uint64), np.arange(8))
    )
    noise = gumbel_noise(key_a, key_b, 20000)
    assert torch.isfinite(noise).all()
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6
    assert abs(noise.mean().item() - 0.5772) < 0.01
    assert abs(noise.var().item() - np.pi**2 / 6) < 0.03


@pytest.mark.parametrize("vocab", [7, 1024, 1500])
def test_torch_argmax_uses_the_reference_noise(vocab):
    scores = random_logits(6, vocab)
    scores[1, 3:] = -float("inf")  # masked tokens never win
    key_a, key_b = (
        torch.from_numpy(k) for k in row_keys(np.arange(6, dtype=np.uint64) * 31, np.arange(6))
    )
    noisy = torch.tensor([1, 1, 0, 1, 0, 1], dtype=torch.int32)
    expected = (scores + gumbel_noise(key_a, key_b, vocab) * noisy[:, None]).argmax(dim=1)
    chosen = torch_gumbel_argmax(scores, key_a, key_b, noisy)
    assert torch.equal(chosen, expected)
    assert chosen[1] < 3
    assert torch.equal(chosen[[2, 4]], scores[[2, 4]].argmax(dim=1))


@needs_triton
@pytest.mark.parametrize("device", KERNEL_DEVICES)
@pytest.mark.parametrize("vocab", [5, 1024, 1500])
def test_triton_kernel_draws_the_reference_tokens(device, vocab):
    from ppruntime.kernels.sampling import gumbel_argmax

    rows = 12
    scores = random_logits(rows, vocab, seed=vocab, device=device)
    scores[0, 1:] = -float("inf")
    scores[3, :] = 0.0  # all tied: greedy takes the lowest id, noisy rows differ by row
    keys = row_keys(np.arange(rows, dtype=np.uint64) * 7 + 3, np.arange(rows) * 11)
    key_a, key_b = (torch.from_numpy(k).to(device) for k in keys)
    noisy = torch.tensor([1, 1, 0, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.int32, device=device)
    chosen = gumbel_argmax(scores, key_a, key_b, noisy)
    expected = torch_gumbel_argmax(scores.cpu(), key_a.cpu(), key_b.cpu(), noisy.cpu())
    assert chosen.dtype == torch.int64
    assert torch.equal(chosen.cpu(), expected)
    assert chosen[0] == 0 and chosen[3] == 0


# -- the masks and the greedy rows are the reference's -------------------------------------
MASK_CASES = {
    "top-k": dict(top_k=[3, 0, 1, 10, 39, 40, 10**6]),
    "top-p": dict(top_p=[0.05, 0.5, 0.9, 1.0, 0.999, 0.3, 1e-6]),
    "min-p": dict(min_p=[0.0, 0.05, 0.5, 1.0, 0.2, 0.01, 0.9]),
    "all": dict(
        temperature=[0.5, 1.0, 2.0, 0.7, 1.3, 0.9, 3.0],
        top_k=[5, 0, 20, 3, 1, 0, 40],
        top_p=[0.9, 0.8, 1.0, 0.5, 1.0, 0.95, 0.6],
        min_p=[0.1, 0.0, 0.05, 0.0, 0.3, 0.02, 0.0],
    ),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(MASK_CASES))
def test_masks_equal_the_reference_masks(device, case):
    logits = random_logits(7, seed=len(case), device=device)
    rows = make_rows(7, **MASK_CASES[case])
    kept = torch.isfinite(sampling_scores(logits, rows)).cpu()
    assert torch.equal(kept, reference_probs(logits, rows) > 0)
    assert kept.any(dim=1).all()


@pytest.mark.parametrize("device", DEVICES)
def test_greedy_rows_take_the_raw_argmax_in_a_mixed_batch(device):
    logits = random_logits(6, device=device)
    logits[0, [3, 5]] = 100.0  # a tie: the lowest id
    rows = make_rows(6, temperature=[0.0, 1.0, 0.0, 0.7, 0.0, 2.0], top_k=1)
    tokens = DeviceSampler().sample(logits, rows).to_host().wait().token_ids
    argmax = logits.argmax(dim=-1).cpu().numpy()
    assert tokens.dtype == np.int32 and tokens.shape == (6,)
    assert tokens[0] == 3
    np.testing.assert_array_equal(tokens[[0, 2, 4]], argmax[[0, 2, 4]])
    np.testing.assert_array_equal(tokens[[1, 3, 5]], argmax[[1, 3, 5]])  # top_k = 1


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise", ["torch", "triton"])
def test_greedy_is_argmax(device, noise):
    logits = random_logits(5, vocab=1100, device=device)
    result = sampler_for(device, noise).sample(logits, make_rows(5, temperature=0.0))
    host = result.to_host().wait()
    np.testing.assert_array_equal(host.token_ids, logits.argmax(-1).cpu().numpy())
    assert host.logprobs is None and host.top_token_ids is None and host.logits is None


# -- the draws follow the filtered distribution ---------------------------------------------
def chi_square(counts: np.ndarray, probs: np.ndarray, draws: int) -> tuple[float, int]:
    expected = probs * draws
    cells = expected >= 5
    rest_expected, rest_counts = expected[~cells].sum(), counts[~cells].sum()
    statistic = float((((counts[cells] - expected[cells]) ** 2) / expected[cells]).sum())
    dof = int(cells.sum()) - 1
    if rest_expected >= 5:
        statistic += (rest_counts - rest_expected) ** 2 / rest_expected
        dof += 1
    return statistic, dof


DISTRIBUTION_CASES = {
    "plain": dict(),
    "hot": dict(temperature=2.0),
    "top-k": dict(top_k=6),
    "top-p": dict(top_p=0.7),
    "min-p": dict(min_p=0.05, temperature=1.5),
    "all": dict(temperature=0.8, top_k=12, top_p=0.9, min_p=0.01),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", sorted(DISTRIBUTION_CASES))
def test_draws_follow_the_filtered_probabilities(device, case):
    # one request's draws at 3000 positions: one batch of 3000 rows of the same logits
    draws, vocab = 3000, 16
    logits = random_logits(1, vocab, seed=5).expand(draws, vocab).contiguous().to(device)
    rows = make_rows(
        draws, seeds=[77] * draws, positions=np.arange(draws), **DISTRIBUTION_CASES[case]
    )
    noise = "triton" if device == "cuda" else "torch"
    tokens = sampler_for(device, noise).sample(logits, rows).to_host().wait().token_ids
    probs = reference_probs(logits[:1], make_rows(1, **DISTRIBUTION_CASES[case]))[0].numpy()
    counts = np.bincount(tokens, minlength=vocab)
    assert (counts[probs == 0] == 0).all(), "a filtered-out token was drawn"
    statistic, dof = chi_square(counts, probs, draws)
    # the 99.99th percentile of chi-square is below dof + 6 sqrt(2 dof) + 10
    assert statistic < dof + 6 * np.sqrt(2 * dof) + 10, (statistic, dof, counts, probs * draws)


def test_two_token_distribution():
    p_one, draws = 0.3, 4000
    logits = torch.tensor([[np.log(1 - p_one), np.log(p_one)]], dtype=torch.float32)
    rows = make_rows(draws, seeds=[123] * draws, positions=np.arange(draws))
    tokens = DeviceSampler().sample(logits.expand(draws, 2), rows).to_host().wait().token_ids
    # std of the count is sqrt(4000 * 0.21) ~ 29; allow ~5 sigma
    assert abs(int(tokens.sum()) - p_one * draws) < 145


# -- a seeded row: the same tokens in any batch ---------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("noise", ["torch", "triton"])
def test_seeded_row_is_independent_of_its_batch(device, noise):
    sampler = sampler_for(device, noise)
    vocab = 1100  # two vocabulary blocks of the kernel
    steps = [random_logits(5, vocab, seed=step, device=device) for step in range(4)]
    mine = dict(temperature=0.8, top_k=50, top_p=0.95)

    def alone(logits, position):
        rows = make_rows(1, seeds=[42], positions=[position], **mine)
        return int(sampler.sample(logits[:1], rows).to_host().wait().token_ids[0])

    def in_a_crowd(logits, position, order):
        # the row among greedy, other seeds, other filters; rows in `order`
        params = [
            dict(temperature=0.0, top_k=0, top_p=1.0, seed=1, position=3),
            dict(temperature=1.3, top_k=5, top_p=1.0, seed=7, position=position),
            dict(**mine, seed=42, position=position),
            dict(temperature=0.0, top_k=0, top_p=1.0, seed=42, position=9),
            dict(temperature=1.0, top_k=0, top_p=0.5, seed=43, position=position),
        ]
        picked = [params[i] for i in order]
        rows = make_rows(
            len(order),
            temperature=[p["temperature"] for p in picked],
            top_k=[p["top_k"] for p in picked],
            top_p=[p["top_p"] for p in picked],
            seeds=[p["seed"] for p in picked],
            positions=[p["position"] for p in picked],
        )
        tokens = sampler.sample(logits[list(order)], rows).to_host().wait().token_ids
        return int(tokens[order.index(2)])

    for position, logits in enumerate(steps):
        # alone, row 0 holds logits row 2 of the crowd
        expected = alone(logits[[2, 0, 1, 3, 4]], position + 10)
        for order in ([0, 1, 2, 3, 4], [2, 4, 3, 1, 0], [4, 2], [2]):
            assert in_a_crowd(logits, position + 10, order) == expected, order


@pytest.mark.parametrize("device", DEVICES)
def test_same_seed_same_tokens_different_seed_or_position_differs(device):
    logits = torch.zeros(6, 1000, device=device)
    sampler = DeviceSampler()

    def draw(seeds, positions):
        rows = make_rows(6, seeds=seeds, positions=positions)
        return sampler.sample(logits, rows).to_host().wait().token_ids.tolist()

    first = draw([5] * 6, range(6))
    assert draw([5] * 6, range(6)) == first
    assert draw([6] * 6, range(6)) != first
    assert draw([5] * 6, range(1, 7)) != first
    assert len(set(first)) > 1  # the position changes the draw


# -- log-probs and logits come back as the reference computes them --------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_equal_the_references(device, temperature):
    logits = random_logits(4, device=device)
    rows = make_rows(4, temperature=temperature, top_k=5, num_logprobs=3)
    host = DeviceSampler().sample(logits, rows).to_host().wait()
    generators = [reference.make_generator(i) for i in range(4)]
    batch = reference.SamplingBatch(
        rows.temperature, rows.top_k, rows.top_p, rows.min_p, generators, num_logprobs=3
    )
    expected = reference.Sampler()._with_logprobs(
        logits.cpu(), torch.from_numpy(host.token_ids).long(), host.token_ids, 3
    )
    assert batch.num_logprobs == 3
    np.testing.assert_allclose(host.logprobs, expected.logprobs, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(host.top_token_ids, expected.top_token_ids)
    np.testing.assert_allclose(host.top_logprobs, expected.top_logprobs, rtol=1e-5, atol=1e-6)
    assert host.logprobs.dtype == np.float32 and host.top_logprobs.dtype == np.float32
    assert host.top_token_ids.dtype == np.int32 and host.top_token_ids.shape == (4, 3)
    if temperature == 0.0:
        np.testing.assert_array_equal(host.token_ids, logits.argmax(-1).cpu().numpy())


@pytest.mark.parametrize("device", DEVICES)
def test_requested_logit_rows_come_back(device):
    logits = random_logits(5, device=device)
    rows = make_rows(5, temperature=[0.0, 0.9, 0.0, 1.0, 0.0], num_logprobs=2)
    rows.logit_rows = np.asarray([1, 4])
    host = DeviceSampler().sample(logits, rows).to_host().wait()
    np.testing.assert_array_equal(host.logits, logits[[1, 4]].cpu().numpy())
    assert host.top_token_ids.shape == (5, 2)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("temperature", [1e-40, 1e-30, 9.9e-6])
def test_temperature_below_eps_is_greedy(device, temperature):
    """Dividing by such a temperature overflows float32 (logits inf, scores NaN)."""
    logits = random_logits(6, device=device)
    host = DeviceSampler().sample(logits, make_rows(6, temperature=temperature)).to_host().wait()
    np.testing.assert_array_equal(host.token_ids, logits.argmax(-1).cpu().numpy())
    assert host.nonfinite_rows() is None


def _poisoned_logits(device: str) -> torch.Tensor:
    logits = random_logits(6, device="cpu")
    logits[1, 7] = float("nan")
    logits[3, 2] = float("inf")
    logits[4] = -float("inf")  # no finite logit at all
    logits[5, 0] = -float("inf")  # rules token 0 out: harmless
    return logits.to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "temperature, num_logprobs",
    [(0.0, 0), (0.0, 2), (0.8, 0), ([0.0, 0.9, 0.0, 0.5, 1.0, 0.0], 1)],
)
def test_nonfinite_rows_come_back_flagged(device, temperature, num_logprobs):
    rows = make_rows(6, temperature=temperature, num_logprobs=num_logprobs)
    host = DeviceSampler().sample(_poisoned_logits(device), rows).to_host().wait()
    nonfinite = host.nonfinite_rows()
    assert nonfinite is not None
    assert nonfinite.tolist() == [False, True, False, True, True, False]
    clean = random_logits(6, device=device)
    clean[2, :5] = -float("inf")
    assert DeviceSampler().sample(clean, rows).to_host().wait().nonfinite_rows() is None


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_kernel_is_torch_argmax_ties_lowest_and_flags_nonfinite(device, dtype):
    """The all-greedy step's Triton kernel: torch's argmax (the lowest id on ties, across
    vocabulary blocks too), and the rows with a NaN, a +inf or no finite logit flagged
    through the sampler, as the torch path flags them."""
    sampler = sampler_for(device, "triton")
    logits = random_logits(6, vocab=2100, device="cpu")
    logits[0, [5, 1500]] = 50.0  # a tie in two vocabulary blocks: 5 wins
    logits[2, [1030, 1031]] = 60.0  # a tie inside one block
    logits = logits.to(dtype)
    rows = make_rows(6, temperature=0.0)
    host = sampler.sample(logits.to(device), rows).to_host().wait()
    assert host.token_ids.tolist()[0] == 5 and host.token_ids.tolist()[2] == 1030
    np.testing.assert_array_equal(host.token_ids, logits.float().argmax(-1).numpy())
    np.testing.assert_array_equal(host.max_logits, logits.float().amax(-1).numpy())
    assert host.nonfinite_rows() is None
    poisoned = sampler.sample(_poisoned_logits(device).to(dtype), rows).to_host().wait()
    assert poisoned.nonfinite_rows().tolist() == [False, True, False, True, True, False]


def test_empty_batch():
    rows = make_rows(0, num_logprobs=2)
    host = DeviceSampler().sample(torch.zeros(0, VOCAB), rows).to_host().wait()
    assert host.token_ids.shape == (0,) and host.top_token_ids.shape == (0, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_sample_does_not_wait_on_the_device():
    logits = random_logits(8, vocab=5000, device="cuda")
    rows = make_rows(8, temperature=0.8, top_k=40, top_p=0.9, min_p=0.01, num_logprobs=4)
    rows.logit_rows = np.asarray([0, 5])
    sampler = DeviceSampler()
    sampler.sample(logits, rows).to_host().wait()  # compile the kernel first
    torch.cuda.set_sync_debug_mode("error")
    try:
        transfer = sampler.sample(logits, rows).to_host()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    host = transfer.wait()
    assert host.token_ids.shape == (8,) and host.logits.shape == (2, 5000)


def test_a_packed_transfer_unpacks_into_ids_and_maxima():
    """The greedy kernel's [2, N] int32 result travels as it is (CUDA: one pinned copy);
    the host side reads row 0 as the ids and row 1 as the maxima's float32 bits."""
    from ppruntime.stage.device_sampler import HostTransfer

    ids = torch.tensor([7, 0, 3], dtype=torch.int32)
    maxima = torch.tensor([1.5, float("nan"), -2.0])
    packed = torch.stack([ids, maxima.view(torch.int32)])
    sample = DeviceSample(packed[0], None, None, None, None, packed[1].view(torch.float32))
    sample.packed = packed
    layout = [("token_ids", (3,), np.dtype(np.int32)), ("max_logits", (3,), np.dtype(np.float32))]
    host = HostTransfer(packed.clone(), None, layout).wait()
    assert host.token_ids.tolist() == [7, 0, 3]
    np.testing.assert_array_equal(host.max_logits, maxima.numpy())
    assert host.nonfinite_rows().tolist() == [False, True, False]
    assert [name for name, _ in sample._parts()] == [name for name, _, _ in layout]

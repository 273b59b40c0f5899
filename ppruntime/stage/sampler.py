"""Batched token sampling on the last pipeline stage.

All the math (temperature, top-k, top-p, min-p, log-probs) runs as masks over the
whole ``[N, V]`` logits tensor. The only per-row Python work is drawing each sampled
row's noise from that row's own generator, so a request's tokens depend only on its
seed and on how many draws it has made, never on the other rows of the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ppruntime.stage.greedy import SAMPLING_EPS


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A fresh generator seeded with ``seed`` (one per seeded request)."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class SamplingBatch:
    """Per-row sampling parameters, built by the caller once per step."""

    temperature: np.ndarray  # [N] float32, 0 = greedy
    top_k: np.ndarray  # [N] int32, 0 (or -1) = off
    top_p: np.ndarray  # [N] float32, 1 = off
    min_p: np.ndarray  # [N] float32, 0 = off
    generators: list[torch.Generator | None]  # [N]; None for greedy rows
    num_logprobs: int  # max top-n over rows (0 = none)


@dataclass
class SampleResult:
    token_ids: np.ndarray  # [N] int32
    logprobs: np.ndarray | None  # [N] float32, chosen token's log-prob
    top_token_ids: np.ndarray | None  # [N, K] int32, sorted by log-prob descending
    top_logprobs: np.ndarray | None  # [N, K] float32
    nonfinite: np.ndarray | None = None  # [N] bool rows with NaN/inf logits; None: all fine


def nonfinite_rows(
    logits: torch.Tensor, greedy_tokens: np.ndarray | None = None
) -> np.ndarray | None:
    """[N] bool: the rows whose maximum logit is not finite; None when every row is fine.

    That is a NaN anywhere in the row (the maximum propagates NaN), a +inf, or no
    finite logit at all: rows whose token would be garbage. A -inf next to finite
    logits only rules that token out, which is harmless. With the argmax of every row
    at hand (``greedy_tokens``, CPU logits), the check reads only the N chosen values,
    as argmax picks the first NaN and any +inf; otherwise it costs one max reduction.
    """
    if greedy_tokens is not None and logits.device.type == "cpu":
        maxima = logits.numpy()[np.arange(greedy_tokens.shape[0]), greedy_tokens]
    else:
        maxima = logits.amax(dim=-1).cpu().numpy()
    finite = np.isfinite(maxima)
    if finite.all():
        return None
    return ~finite


class Sampler:
    """Samples one token per row from ``[N, V]`` float32 logits.

    Greedy rows (temperature below ``SAMPLING_EPS``) take the argmax; ties go to the
    lowest index.
    Sampled rows apply temperature, then top-k, top-p (nucleus, always keeping the
    most likely token) and min-p (relative to the most likely token's probability),
    then draw with the exponential race: ``argmax(probs / E)`` with ``E ~ Exp(1)``
    drawn from the row's generator, which picks token ``i`` with probability
    ``probs[i]``. Rows without a generator draw from the global torch RNG.

    Log-probs are ``log_softmax`` of the RAW logits, before temperature, top-k,
    top-p and min-p (vLLM's default, and what transformers returns as scores). When
    ``num_logprobs > 0`` the result carries the chosen token's log-prob for every row
    and the top ``num_logprobs`` ids/log-probs, sorted descending.

    ``SampleResult.nonfinite`` marks the rows whose logits hold a NaN or an inf (see
    `nonfinite_rows`): their token is meaningless and the caller must not use it.
    """

    def greedy(self, logits: torch.Tensor) -> np.ndarray:
        """[N] int32 argmax of every row (ties go to the lowest index)."""
        if logits.device.type == "cpu":
            # numpy's argmax is an order of magnitude faster than torch's on CPU;
            # both return the first maximum
            return np.argmax(logits.numpy(), axis=-1).astype(np.int32)
        return logits.argmax(dim=-1).to(torch.int32).cpu().numpy()

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> SampleResult:
        # logits: [N, V] float32
        greedy_rows = batch.temperature < SAMPLING_EPS  # [N] bool
        if greedy_rows.all() and logits.device.type == "cpu":
            token_ids = self.greedy(logits)
            nonfinite = nonfinite_rows(logits, token_ids)
            if batch.num_logprobs <= 0:
                return SampleResult(token_ids, None, None, None, nonfinite)
            chosen = torch.from_numpy(token_ids.astype(np.int64))
            result = self._with_logprobs(logits, chosen, token_ids, batch.num_logprobs)
        else:
            if greedy_rows.all():
                chosen = logits.argmax(dim=-1)  # [N]
            else:
                chosen = self._sample_mixed(logits, batch, greedy_rows)
            token_ids = chosen.to(torch.int32).cpu().numpy()
            nonfinite = nonfinite_rows(logits)
            if batch.num_logprobs <= 0:
                return SampleResult(token_ids, None, None, None, nonfinite)
            result = self._with_logprobs(logits, chosen, token_ids, batch.num_logprobs)
        result.nonfinite = nonfinite
        return result

    def _sample_mixed(
        self, logits: torch.Tensor, batch: SamplingBatch, greedy_rows: np.ndarray
    ) -> torch.Tensor:
        device = logits.device
        # Greedy rows get temperature 1 here; their sampled value is overwritten below.
        temperature = np.where(greedy_rows, 1.0, batch.temperature).astype(np.float32)
        scaled = logits / torch.from_numpy(temperature).to(device).unsqueeze(1)  # [N, V]
        scaled = _apply_top_k(scaled, batch.top_k)
        scaled = _apply_top_p(scaled, batch.top_p)
        probs = scaled.softmax(dim=-1)  # [N, V]
        probs = _apply_min_p(probs, batch.min_p)
        noise = _exponential_noise(probs.shape, batch.generators, greedy_rows, device)
        sampled = (probs / noise).argmax(dim=-1)  # [N]
        if greedy_rows.any():
            greedy = logits.argmax(dim=-1)  # [N]
            sampled = torch.where(torch.from_numpy(greedy_rows).to(device), greedy, sampled)
        return sampled

    @staticmethod
    def _with_logprobs(
        logits: torch.Tensor, chosen: torch.Tensor, token_ids: np.ndarray, num_logprobs: int
    ) -> SampleResult:
        logprobs = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
        chosen_logprobs = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)  # [N]
        k = min(num_logprobs, logprobs.shape[1])
        top_values, top_ids = logprobs.topk(k, dim=-1)  # [N, K], sorted descending
        return SampleResult(
            token_ids=token_ids,
            logprobs=chosen_logprobs.cpu().numpy().astype(np.float32, copy=False),
            top_token_ids=top_ids.to(torch.int32).cpu().numpy(),
            top_logprobs=top_values.cpu().numpy().astype(np.float32, copy=False),
        )


def _apply_top_k(scaled: torch.Tensor, top_k: np.ndarray) -> torch.Tensor:
    """Mask all but the ``top_k`` largest logits per row (k <= 0 or k >= V: no-op)."""
    vocab = scaled.shape[1]
    active = (top_k > 0) & (top_k < vocab)  # [N] bool
    if not active.any():
        return scaled
    k = np.where(active, top_k, vocab).astype(np.int64)  # [N], vocab = keep all
    k_max = int(k[active].max())
    top_values = scaled.topk(k_max, dim=-1).values  # [N, k_max] sorted descending
    k_index = torch.from_numpy(np.minimum(k, k_max) - 1).to(scaled.device).unsqueeze(1)
    threshold = top_values.gather(1, k_index)  # [N, 1], k-th largest value
    inactive = torch.from_numpy(~active).to(scaled.device).unsqueeze(1)  # [N, 1]
    keep = (scaled >= threshold) | inactive  # ties at the threshold are kept
    return scaled.masked_fill(~keep, -float("inf"))


def _apply_top_p(scaled: torch.Tensor, top_p: np.ndarray) -> torch.Tensor:
    """Keep the smallest set of tokens whose probability mass reaches ``top_p``.

    The most likely token is always kept; rows with ``top_p == 1`` are left untouched.
    """
    active = top_p < 1.0  # [N] bool
    if not active.any():
        return scaled
    device = scaled.device
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [N, V]
    sorted_probs = sorted_logits.softmax(dim=-1)  # [N, V]
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs  # mass of better-ranked tokens
    p = torch.from_numpy(top_p.astype(np.float32)).to(device).unsqueeze(1)  # [N, 1]
    drop_sorted = mass_before >= p  # [N, V]
    drop_sorted[:, 0] = False
    drop_sorted &= torch.from_numpy(active).to(device).unsqueeze(1)
    drop = torch.zeros_like(drop_sorted).scatter_(1, order, drop_sorted)  # vocab order
    return scaled.masked_fill(drop, -float("inf"))


def _apply_min_p(probs: torch.Tensor, min_p: np.ndarray) -> torch.Tensor:
    """Zero tokens whose probability is below ``min_p`` times the row's maximum."""
    if not (min_p > 0.0).any():
        return probs
    factor = torch.from_numpy(min_p.astype(np.float32)).to(probs.device).unsqueeze(1)  # [N, 1]
    threshold = probs.amax(dim=-1, keepdim=True) * factor  # [N, 1]
    return probs.masked_fill(probs < threshold, 0.0)


def _exponential_noise(
    shape: torch.Size,
    generators: list[torch.Generator | None],
    greedy_rows: np.ndarray,
    device: torch.device,
) -> torch.Tensor:
    """``Exp(1)`` noise [N, V]; each sampled row drawn from its own generator.

    Greedy rows get ones (their draw is discarded) and consume no randomness.
    """
    vocab = shape[1]
    ones = torch.ones(vocab, dtype=torch.float32, device=device)
    rows = [
        ones
        if is_greedy
        else torch.empty(vocab, dtype=torch.float32, device=device).exponential_(
            generator=generator
        )
        for is_greedy, generator in zip(greedy_rows.tolist(), generators)
    ]
    noise = torch.stack(rows)  # [N, V]
    # Exp(1) can round to 0; 0/0 would be NaN, which argmax would pick.
    return noise.clamp_min_(torch.finfo(torch.float32).tiny)

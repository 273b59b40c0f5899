"""paged_attention against a plain per-sequence causal attention."""

from __future__ import annotations

import pytest
import torch
from model_fixtures import PagedBatches

from ppruntime.model import paged_attention

HQ, HKV, D, BLOCK_SIZE, NUM_BLOCKS = 4, 2, 8, 4, 32


def naive_attention(q, k, v, window):
    """q [L, Hq, D] for the last L of the S keys k/v [S, Hkv, D] of one sequence."""
    num_q, num_k = q.shape[0], k.shape[0]
    k = k.repeat_interleave(HQ // HKV, dim=1)
    v = v.repeat_interleave(HQ // HKV, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) / D**0.5
    query_pos = torch.arange(num_k - num_q, num_k)[:, None]
    key_pos = torch.arange(num_k)[None, :]
    visible = key_pos <= query_pos
    if window is not None:
        visible &= key_pos > query_pos - window
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hqk,khd->qhd", probs, v)


@pytest.mark.parametrize("window", [None, 3])
@pytest.mark.parametrize("unwritten", [0.0, float("nan")])
def test_mixed_batch_matches_naive_attention(window, unwritten):
    """Prefill chunks and decode steps; with `unwritten` NaN, every cache slot no sequence
    wrote (the rest of their last blocks, the free blocks the table padding points at)
    is NaN: keys past a sequence's length must not reach its output."""
    generator = torch.Generator().manual_seed(0)
    paging = PagedBatches(NUM_BLOCKS, BLOCK_SIZE, seed=3)
    cache = torch.full((2, NUM_BLOCKS, BLOCK_SIZE, HKV, D), unwritten)
    history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    for step in [[(0, 6), (1, 3)], [(1, 5), (0, 1), (2, 2)], [(2, 1), (0, 1), (1, 1)]]:
        metadata, _ = paging.step(step)
        total = sum(n for _, n in step)
        q = torch.randn(total, HQ, D, generator=generator)
        k = torch.randn(total, HKV, D, generator=generator)
        v = torch.randn(total, HKV, D, generator=generator)
        out = paged_attention(q, k, v, cache, metadata, D**-0.5, window)  # positions derived
        start = 0
        for seq_id, count in step:
            rows = slice(start, start + count)
            old_k, old_v = history.get(seq_id, (k[:0], v[:0]))
            history[seq_id] = (torch.cat([old_k, k[rows]]), torch.cat([old_v, v[rows]]))
            expected = naive_attention(q[rows], *history[seq_id], window)
            torch.testing.assert_close(out[rows], expected, atol=1e-5, rtol=1e-5)
            start += count


def test_narrow_block_table_is_an_error():
    paging = PagedBatches(NUM_BLOCKS, BLOCK_SIZE)
    metadata, _ = paging.step([(0, 9)])
    metadata.block_table = metadata.block_table[:, :2]
    x = torch.zeros(9, HKV, D)
    cache = torch.zeros(2, NUM_BLOCKS, BLOCK_SIZE, HKV, D)
    with pytest.raises(ValueError, match="block_table has 2 columns"):
        paged_attention(torch.zeros(9, HQ, D), x, x, cache, metadata, 1.0)

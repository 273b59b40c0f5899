"""Flash-style paged attention over a mixed batch, and a split-KV decode path.

One kernel, `_paged_attention_kernel`: a program covers BLOCK_Q query tokens of one
sequence x the GROUP query heads that share one KV head (BLOCK_M = BLOCK_Q * GROUP
rows, padded), walks the sequence's keys through its block table BLOCK_N at a time
with an online softmax (log2 domain, fp32 accumulators), and never materialises a
score matrix wider than one tile. Keys are addressed one by one through the block
table, so any cache block size works.

- Mixed batches (prefill chunks with cached prefixes + decode tokens): the grid is
  (num_tokens // BLOCK_Q + num_seqs, Hkv); a program finds its sequence by binary
  search over query_start_loc.
- Decode-only batches (one token per sequence): one program per (sequence, KV head,
  split). Each sequence's visible keys are cut into up to num_splits equal runs of
  whole tiles, at least min_split_keys each, computed on the device from its seq_len;
  split s writes an unnormalised partial output and its (max, sum), and
  `_merge_splits_kernel` combines the splits that held keys. A context that one split
  covers (a short one, whatever the launch's split count) is written directly, and
  the merge kernel skips it. The grid
  depends only on num_seqs, Hkv and num_splits, never on this step's context lengths:
  no host synchronisation, CUDA-graph friendly.

A padded token (seq_len 0) sees no keys and gets zeros.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2_E = 1.4426950408889634
MERGE_CHUNK = 16  # splits the merge kernel combines at a time
# The interpreter's bf16/fp16 tl.dot returns garbage (triton 3.9): interpreted, the dot
# operands are rounded to the cache dtype as on the GPU, then multiplied in float32,
# which gives the same products (a bf16 or fp16 product is exact in float32).
INTERPRETED = os.environ.get("TRITON_INTERPRET", "") == "1"


@triton.jit
def _find_sequence(query_start_loc_ptr, num_seqs, program, BLOCK_Q: tl.constexpr):
    """The last sequence b with query_start_loc[b] // BLOCK_Q + b <= program."""
    low: tl.int32 = 0
    high = num_seqs
    while low < high:
        middle = (low + high) // 2
        first_block = tl.load(query_start_loc_ptr + middle) // BLOCK_Q + middle
        if first_block <= program:
            low = middle + 1
        else:
            high = middle
    return low - 1


@triton.jit
def _split_runs(kv_low, kv_high, num_splits, BLOCK_N: tl.constexpr, MIN_SPLIT_KEYS: tl.constexpr):
    """(base, keys a split, splits used): split s covers [base + s * per, base + (s + 1) *
    per). A split holds at least MIN_SPLIT_KEYS keys (a multiple of BLOCK_N), so a short
    context uses fewer splits than the launch has (one: no merge needed)."""
    base = (kv_low // BLOCK_N) * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(kv_high - base, num_splits), BLOCK_N) * BLOCK_N
    per_split = tl.maximum(per_split, tl.maximum(MIN_SPLIT_KEYS, BLOCK_N))
    return base, per_split, tl.cdiv(kv_high - base, per_split)


@triton.jit
def _attend_tile(
    acc,
    running_max,
    running_sum,
    q,
    q_pos,
    tile_start,
    kv_low,
    kv_high,
    table_ptr,
    k_ptr,  # the cache's K of this program's KV head; V is stride_cache_kv further
    stride_cache_kv,
    stride_cache_block,
    stride_cache_offset,
    scale_log2,
    sliding_window,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    """One BLOCK_N-key tile of the online softmax (causal tiling). Unmasked tiles hold
    keys every query row sees: no key, causal or window masks, no -inf guard."""
    keys = tl.arange(0, BLOCK_N)
    key_pos = tile_start + keys
    dims = tl.arange(0, DIM_PAD)
    if MASKED:
        key_valid = (key_pos >= kv_low) & (key_pos < kv_high)
    # tile_start is a multiple of BLOCK_N: when blocks and tiles nest, the block-table
    # lookups are per block, and the offsets inside a block are the same every tile
    if BLOCK_SIZE % BLOCK_N == 0:  # the tile lies inside one block: one lookup
        block_id = tl.load(table_ptr + tile_start // BLOCK_SIZE).to(tl.int64)
        in_block = tile_start % BLOCK_SIZE + keys
        key_offset = block_id * stride_cache_block + in_block * stride_cache_offset
    elif BLOCK_N % BLOCK_SIZE == 0:  # the tile spans whole blocks
        block_index = tile_start // BLOCK_SIZE + keys // BLOCK_SIZE
        if MASKED:
            block_ids = tl.load(table_ptr + block_index, mask=key_valid, other=0)
        else:
            block_ids = tl.load(table_ptr + block_index)
        key_offset = (
            block_ids.to(tl.int64) * stride_cache_block + (keys % BLOCK_SIZE) * stride_cache_offset
        )
    else:  # any block size: each key's block looked up
        if MASKED:
            block_ids = tl.load(table_ptr + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
        else:
            block_ids = tl.load(table_ptr + key_pos // BLOCK_SIZE)
        key_offset = (
            block_ids.to(tl.int64) * stride_cache_block
            + (key_pos % BLOCK_SIZE) * stride_cache_offset
        )
    k_ptrs = k_ptr + key_offset[None, :] + dims[:, None]  # [DIM_PAD, BLOCK_N]
    v_ptrs = k_ptr + stride_cache_kv + key_offset[:, None] + dims[None, :]  # [BLOCK_N, DIM_PAD]
    if MASKED:
        dim_valid = dims < HEAD_DIM
        k = tl.load(k_ptrs, mask=key_valid[None, :] & dim_valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=key_valid[:, None] & dim_valid[None, :], other=0.0)
    elif HEAD_DIM != DIM_PAD:
        dim_valid = dims < HEAD_DIM
        k = tl.load(k_ptrs, mask=dim_valid[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=dim_valid[None, :], other=0.0)
    else:
        k = tl.load(k_ptrs)
        v = tl.load(v_ptrs)
    cache_type = k_ptr.dtype.element_ty
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    if IEEE:
        scores = tl.dot(q, k, input_precision="ieee")
    else:
        scores = tl.dot(q, k)  # raw q.k; the scale is folded into the exp2 below
    if MASKED:
        visible = key_valid[None, :] & (key_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (key_pos[None, :] > q_pos[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1) * scale_log2)
        # a row that has seen no visible key yet keeps max -inf: shift by 0 instead
        shift = tl.where(new_max == float("-inf"), 0.0, new_max)
    else:
        new_max = tl.maximum(running_max, tl.max(scores, 1) * scale_log2)
        shift = new_max
    probs = tl.exp2(scores * scale_log2 - shift[:, None])  # one FMA a score
    rescale = tl.exp2(running_max - shift)
    running_sum = running_sum * rescale + tl.sum(probs, 1)
    acc = acc * rescale[:, None]
    probs = probs.to(cache_type)  # the rounding of a native bf16/fp16 dot
    if UPCAST:
        probs = probs.to(tl.float32)
    if IEEE:
        acc = tl.dot(probs, v, acc, input_precision="ieee")
    else:
        acc = tl.dot(probs, v, acc)  # accumulate in place: no second [BLOCK_M, D] tile
    return acc, new_max, running_sum


@triton.jit(do_not_specialize=["num_seqs", "sliding_window"])
def _paged_attention_kernel(
    out_ptr,  # [T, Hq, D] (not SPLIT)
    partial_out_ptr,  # [T, Hq, num_splits, D] float32 (SPLIT; num_splits = grid dim 2)
    partial_stats_ptr,  # [T, Hq, num_splits, 2] float32: running max (log2), sum
    q_ptr,  # [T, Hq, D]
    cache_ptr,  # [2, NB, BS, Hkv, D]
    query_start_loc_ptr,  # [B + 1]
    seq_lens_ptr,  # [B]
    block_table_ptr,  # [B or R, max_blocks]
    block_table_rows_ptr,  # [B] (HAS_ROWS)
    scale_log2,
    sliding_window,
    num_seqs,
    stride_q_token,
    stride_q_head,
    stride_out_token,
    stride_out_head,
    stride_cache_kv,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    stride_table_row,
    BLOCK_SIZE: tl.constexpr,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    MIN_SPLIT_KEYS: tl.constexpr,
    ONE_PROGRAM_PER_SEQ: tl.constexpr,
    HAS_ROWS: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    CAUSAL_TILING: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
):
    program = tl.program_id(0)
    if CAUSAL_TILING:
        # the last query blocks of a sequence see the most keys: start them first, so
        # that the short ones fill the tail of the grid
        program = tl.num_programs(0) - 1 - program
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    if ONE_PROGRAM_PER_SEQ:
        seq = program
        q_block = 0
    else:
        seq = _find_sequence(query_start_loc_ptr, num_seqs, program, BLOCK_Q)
        q_block = program - (tl.load(query_start_loc_ptr + seq) // BLOCK_Q + seq)
    first_token = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - first_token
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # keys cached before this step's tokens

    rows = tl.arange(0, BLOCK_M)
    token_in_block = rows // GROUP
    q_index = q_block * BLOCK_Q + token_in_block
    row_valid = (token_in_block < BLOCK_Q) & (q_index < q_len)
    q_head = kv_head * GROUP + rows % GROUP
    q_token = (first_token + q_index).to(tl.int64)
    q_pos = context_len + q_index
    dims = tl.arange(0, DIM_PAD)
    dim_valid = dims < HEAD_DIM
    cache_type = cache_ptr.dtype.element_ty
    q = tl.load(
        q_ptr + q_token[:, None] * stride_q_token + q_head[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    ).to(cache_type)
    if UPCAST:
        q = q.to(tl.float32)

    # keys this program may need: up to its last query, from its first query's window
    kv_high = context_len + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
    kv_low = 0
    if USE_WINDOW:
        kv_low = tl.maximum(context_len + q_block * BLOCK_Q - sliding_window + 1, 0)
    if SPLIT:
        base, per_split, splits_used = _split_runs(
            kv_low, kv_high, tl.num_programs(2), BLOCK_N, MIN_SPLIT_KEYS
        )
        kv_low = tl.maximum(kv_low, base + split * per_split)
        kv_high = tl.minimum(kv_high, base + split * per_split + per_split)
        if kv_low >= kv_high:
            return
    if HAS_ROWS:
        table_row = tl.load(block_table_rows_ptr + seq).to(tl.int64)
    else:
        table_row = seq.to(tl.int64)
    table_ptr = block_table_ptr + table_row * stride_table_row
    head_offset = kv_head.to(tl.int64) * stride_cache_head

    running_max = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], dtype=tl.float32)
    if CAUSAL_TILING:
        # tiles [full_low, full_high) hold keys every row of this query block sees (at or
        # before its first query, inside its last query's window): no masks there; the
        # tiles before them (window) and after them (the diagonal) are masked
        first_pos = context_len + q_block * BLOCK_Q
        low = (kv_low // BLOCK_N) * BLOCK_N
        tiles_end = tl.cdiv(kv_high, BLOCK_N) * BLOCK_N
        full_low = low
        if USE_WINDOW:
            window_start = tl.maximum(kv_high - sliding_window, 0)  # the last row's first key
            full_low = tl.maximum(low, tl.cdiv(window_start, BLOCK_N) * BLOCK_N)
            full_low = tl.minimum(full_low, tiles_end)
            for tile_start in range(low, full_low, BLOCK_N):
                acc, running_max, running_sum = _attend_tile(
                    acc, running_max, running_sum, q, q_pos, tile_start, kv_low, kv_high,
                    table_ptr, cache_ptr + head_offset, stride_cache_kv, stride_cache_block,
                    stride_cache_offset, scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM,
                    DIM_PAD, BLOCK_N, True, USE_WINDOW, IEEE, UPCAST,
                )  # fmt: skip
        full_high = tl.maximum(((first_pos + 1) // BLOCK_N) * BLOCK_N, full_low)
        for tile_start in range(full_low, full_high, BLOCK_N):
            acc, running_max, running_sum = _attend_tile(
                acc, running_max, running_sum, q, q_pos, tile_start, kv_low, kv_high,
                table_ptr, cache_ptr + head_offset, stride_cache_kv, stride_cache_block,
                stride_cache_offset, scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM,
                DIM_PAD, BLOCK_N, False, USE_WINDOW, IEEE, UPCAST,
            )  # fmt: skip
        for tile_start in range(full_high, kv_high, BLOCK_N):
            acc, running_max, running_sum = _attend_tile(
                acc, running_max, running_sum, q, q_pos, tile_start, kv_low, kv_high,
                table_ptr, cache_ptr + head_offset, stride_cache_kv, stride_cache_block,
                stride_cache_offset, scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM,
                DIM_PAD, BLOCK_N, True, USE_WINDOW, IEEE, UPCAST,
            )  # fmt: skip
    else:
        for tile_start in range((kv_low // BLOCK_N) * BLOCK_N, kv_high, BLOCK_N):
            key_pos = tile_start + tl.arange(0, BLOCK_N)
            key_valid = (key_pos >= kv_low) & (key_pos < kv_high)
            block_ids = tl.load(table_ptr + key_pos // BLOCK_SIZE, mask=key_valid, other=0)
            key_offset = (
                block_ids.to(tl.int64) * stride_cache_block
                + (key_pos % BLOCK_SIZE) * stride_cache_offset
                + head_offset
            )
            k = tl.load(
                cache_ptr + key_offset[None, :] + dims[:, None],
                mask=key_valid[None, :] & dim_valid[:, None],
                other=0.0,
            )  # [DIM_PAD, BLOCK_N]
            v = tl.load(
                cache_ptr + stride_cache_kv + key_offset[:, None] + dims[None, :],
                mask=key_valid[:, None] & dim_valid[None, :],
                other=0.0,
            )  # [BLOCK_N, DIM_PAD]
            probs_type = cache_type
            if UPCAST:
                k = k.to(tl.float32)
                v = v.to(tl.float32)
                probs_type = tl.float32
            if IEEE:
                scores = tl.dot(q, k, input_precision="ieee")
            else:
                scores = tl.dot(q, k)
            scores = scores * scale_log2
            visible = key_valid[None, :] & (key_pos[None, :] <= q_pos[:, None])
            if USE_WINDOW:
                visible = visible & (key_pos[None, :] > q_pos[:, None] - sliding_window)
            scores = tl.where(visible, scores, float("-inf"))
            new_max = tl.maximum(running_max, tl.max(scores, 1))
            # a row that has seen no visible key yet keeps max -inf: shift by 0 instead
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
            probs = tl.exp2(scores - shift[:, None])
            rescale = tl.exp2(running_max - shift)
            running_sum = running_sum * rescale + tl.sum(probs, 1)
            probs = probs.to(cache_type)  # the rounding of a native bf16/fp16 dot
            if IEEE:
                update = tl.dot(probs.to(probs_type), v, input_precision="ieee")
            else:
                update = tl.dot(probs.to(probs_type), v)
            acc = acc * rescale[:, None] + update
            running_max = new_max

    if SPLIT:
        # one split held every key (a context up to MIN_SPLIT_KEYS): it writes the output
        # itself, and the merge kernel skips the token
        write_partial = splits_used > 1
    else:
        write_partial = False
    if not write_partial:
        denominator = tl.where(running_sum > 0.0, running_sum, 1.0)
        out = acc / denominator[:, None]
        tl.store(
            out_ptr
            + q_token[:, None] * stride_out_token
            + q_head[:, None] * stride_out_head
            + dims[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_valid[:, None] & dim_valid[None, :],
        )
    else:
        cell = (q_token * (GROUP * tl.num_programs(1)) + q_head) * tl.num_programs(2) + split
        tl.store(
            partial_out_ptr + cell[:, None] * HEAD_DIM + dims[None, :],
            acc,
            mask=row_valid[:, None] & dim_valid[None, :],
        )
        tl.store(partial_stats_ptr + cell * 2, running_max, mask=row_valid)
        tl.store(partial_stats_ptr + cell * 2 + 1, running_sum, mask=row_valid)


@triton.jit(do_not_specialize=["sliding_window", "num_splits"])
def _merge_splits_kernel(
    out_ptr,  # [T, Hq, D]
    partial_out_ptr,  # [T, Hq, num_splits, D] float32
    partial_stats_ptr,  # [T, Hq, num_splits, 2] float32
    seq_lens_ptr,  # [B] (decode: token t is sequence t)
    sliding_window,
    num_splits,
    stride_out_token,
    stride_out_head,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MIN_SPLIT_KEYS: tl.constexpr,
    CHUNK: tl.constexpr,
    USE_WINDOW: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + token)
    kv_low = 0
    if USE_WINDOW:
        kv_low = tl.maximum(seq_len - sliding_window, 0)
    base, per_split, used = _split_runs(kv_low, seq_len, num_splits, BLOCK_N, MIN_SPLIT_KEYS)
    if used == 1:
        return  # the only split wrote the output (a padded row, no keys: zeros below)
    dims = tl.arange(0, DIM_PAD)
    dim_valid = dims < HEAD_DIM
    cell = (token.to(tl.int64) * tl.num_programs(1) + head) * num_splits
    running_max = tl.full([1], float("-inf"), dtype=tl.float32)
    running_sum = tl.zeros([1], dtype=tl.float32)
    acc = tl.zeros([DIM_PAD], dtype=tl.float32)
    for chunk_start in range(0, used, CHUNK):
        splits = chunk_start + tl.arange(0, CHUNK)
        valid = splits < used
        split_max = tl.load(partial_stats_ptr + (cell + splits) * 2, mask=valid, other=-1e30)
        split_sum = tl.load(partial_stats_ptr + (cell + splits) * 2 + 1, mask=valid, other=0.0)
        split_out = tl.load(
            partial_out_ptr + (cell + splits)[:, None] * HEAD_DIM + dims[None, :],
            mask=valid[:, None] & dim_valid[None, :],
            other=0.0,
        )
        new_max = tl.maximum(running_max, tl.max(split_max, 0))  # finite: split 0 is used
        old_weight = tl.exp2(running_max - new_max)
        weights = tl.where(valid, tl.exp2(split_max - new_max), 0.0)
        running_sum = running_sum * old_weight + tl.sum(weights * split_sum, 0)
        acc = acc * old_weight + tl.sum(weights[:, None] * split_out, 0)
        running_max = new_max
    denominator = tl.where(running_sum > 0.0, running_sum, 1.0)
    tl.store(
        out_ptr + token.to(tl.int64) * stride_out_token + head * stride_out_head + dims,
        (acc / denominator).to(out_ptr.dtype.element_ty),
        mask=dim_valid,
    )


@dataclass(frozen=True)
class AttentionLaunch:
    """How to launch paged attention (host ints only; fixed for a CUDA-graph capture).

    one_program_per_seq: decode-only batches (every sequence has exactly one new token
        and num_tokens == num_seqs); required when num_splits > 1.
    num_splits: programs a (sequence, KV head) pair's keys are split over.
    causal_tiling: mask only the tiles that need it (the diagonal, a window's edge), run
        the query blocks that see the most keys first, and fold the softmax scale into
        one FMA; False runs the single all-masked loop (decode, and the legacy prefill).
    """

    block_m: int
    block_n: int
    one_program_per_seq: bool = False
    num_splits: int = 1
    min_split_keys: int = 0  # fewest keys a split takes (a short context uses fewer splits)
    num_warps: int = 4
    num_stages: int = 2
    causal_tiling: bool = False


def _rows(group: int, block_m: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): at least `block_m` rows, and whole query-head groups."""
    block_m = max(block_m, triton.next_power_of_2(group), 16)
    return block_m, block_m // group


PREFILL_KERNEL_ENV = "PPRUNTIME_TRITON_PREFILL"
PREFILL_KERNELS = ("tiled", "legacy")


def prefill_kernel_from_env() -> str:
    """$PPRUNTIME_TRITON_PREFILL (default "tiled"); ValueError naming a bad value."""
    kernel = os.environ.get(PREFILL_KERNEL_ENV) or "tiled"
    if kernel not in PREFILL_KERNELS:
        raise ValueError(
            f"{PREFILL_KERNEL_ENV}={kernel!r} is not a prefill kernel: use one of "
            f"{', '.join(PREFILL_KERNELS)}"
        )
    return kernel


def prefill_launch(
    dtype: torch.dtype, max_query_len: int, group: int, kernel: str | None = None
) -> AttentionLaunch:
    """Tiles for mixed / prefill batches: 128 query rows once a chunk fills them (the
    usual flash-attention shape on Hopper), fp32 smaller (twice the bytes a tile).

    kernel: "tiled" (default) or "legacy" (the all-masked loop with 64-key tiles, kept
    for comparison); None reads $PPRUNTIME_TRITON_PREFILL.
    """
    if kernel is None:
        kernel = prefill_kernel_from_env()
    elif kernel not in PREFILL_KERNELS:
        raise ValueError(f"prefill kernel {kernel!r}: use one of {', '.join(PREFILL_KERNELS)}")
    if kernel == "legacy":
        if dtype == torch.float32:
            return AttentionLaunch(block_m=32, block_n=32)
        if max_query_len * group >= 128:
            return AttentionLaunch(block_m=128, block_n=64, num_warps=8, num_stages=3)
        return AttentionLaunch(block_m=64, block_n=64)
    if dtype == torch.float32:
        return AttentionLaunch(block_m=32, block_n=32, causal_tiling=True)
    if max_query_len * group >= 128:
        # 128 x 128 tiles halve the per-tile costs (rescaling the [128, D] accumulator,
        # row reductions, barriers) a key against 128 x 64; two stages of K and V tiles
        # (64 KiB each at D=128) and the Q tile fit Hopper's shared memory
        return AttentionLaunch(
            block_m=128, block_n=128, num_warps=8, num_stages=2, causal_tiling=True
        )
    return AttentionLaunch(block_m=64, block_n=64, causal_tiling=True)


def decode_launch(
    num_seqs: int,
    num_kv_heads: int,
    max_context_len: int,
    target_programs: int,
    block_n: int | None = None,
    min_keys_per_split: int = 256,
    max_splits: int = 128,
    head_dim: int = 128,
) -> AttentionLaunch:
    """Split each sequence's keys so that about `target_programs` programs run at once,
    but no more splits than a `max_context_len` context fills with `min_keys_per_split`.

    Depends only on the batch shape and `max_context_len` (the block table's reach, not
    this step's longest context), so one launch serves every step of a captured graph.
    Tiles, warps and stages (block_n None: per head_dim) are those measured fastest over
    batches 1-64 and contexts 192-4k on the H200 (scripts/sweep_decode_attention.py):
    128-key tiles with 4 warps at head_dim <= 64, 64-key tiles with 2 warps above.
    """
    small_head = head_dim <= 64
    if block_n is None:
        block_n = 128 if small_head else 64
    programs = max(num_seqs * num_kv_heads, 1)
    splits = -(-target_programs // programs)
    splits = min(splits, max_splits, -(-max(max_context_len, 1) // max(min_keys_per_split, 1)))
    return AttentionLaunch(
        block_m=16,
        block_n=block_n,
        one_program_per_seq=True,
        num_splits=max(splits, 1),
        min_split_keys=min_keys_per_split,
        num_warps=4 if small_head else 2,
        num_stages=3,
    )


def paged_attention(
    q: torch.Tensor,
    layer_cache: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    block_table: torch.Tensor,
    scale: float,
    launch: AttentionLaunch,
    block_table_rows: torch.Tensor | None = None,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] against the paged cache [2, NB, BS, Hkv, D] -> [T, Hq, D] in q's dtype.

    Sequence b owns tokens [query_start_loc[b], query_start_loc[b + 1]) and has
    seq_lens[b] keys in all (cached prefix + its new tokens, already stored); its
    blocks are row b (or block_table_rows[b]) of block_table. float32 inputs use
    IEEE-precision dots. No host synchronisation.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = layer_cache.shape[3]
    group = num_q_heads // num_kv_heads
    num_seqs = seq_lens.shape[0]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if num_tokens == 0 or num_seqs == 0:
        return out
    if q.stride(-1) != 1:
        q = q.contiguous()
    if layer_cache.stride(-1) != 1:
        raise ValueError("layer_cache must be contiguous in its last (head_dim) dimension")
    block_q = _rows(group, launch.block_m)[1]
    num_splits = launch.num_splits
    if launch.one_program_per_seq:
        grid = (num_seqs, num_kv_heads, num_splits)
    else:
        if num_splits != 1:
            raise ValueError("split-KV attention needs a decode-only launch")
        grid = (num_tokens // block_q + num_seqs, num_kv_heads, 1)
    if launch.causal_tiling and launch.one_program_per_seq:
        raise ValueError("causal_tiling is for mixed / prefill launches, not decode-only ones")
    if num_splits > 1:
        partial_out = torch.empty(
            (num_tokens, num_q_heads, num_splits, head_dim), dtype=torch.float32, device=q.device
        )
        partial_stats = torch.empty(
            (num_tokens, num_q_heads, num_splits, 2), dtype=torch.float32, device=q.device
        )
    else:
        partial_out = partial_stats = out
    window = sliding_window if sliding_window is not None else 0
    _paged_attention_kernel[grid](
        out,
        partial_out,
        partial_stats,
        q,
        layer_cache,
        query_start_loc,
        seq_lens,
        block_table,
        block_table_rows if block_table_rows is not None else seq_lens,
        scale * LOG2_E,
        window,
        num_seqs,
        q.stride(0),
        q.stride(1),
        out.stride(0),
        out.stride(1),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        block_table.stride(0),
        **attention_constants(
            launch,
            group,
            head_dim,
            layer_cache.shape[2],
            q.dtype,
            has_rows=block_table_rows is not None,
            has_window=sliding_window is not None,
        ),
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    if num_splits > 1:
        _merge_splits_kernel[(num_tokens, num_q_heads)](
            out,
            partial_out,
            partial_stats,
            seq_lens,
            window,
            num_splits,
            out.stride(0),
            out.stride(1),
            **merge_constants(launch, head_dim, has_window=sliding_window is not None),
        )
    return out


def attention_constants(
    launch: AttentionLaunch,
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    has_rows: bool,
    has_window: bool,
) -> dict[str, object]:
    """The compile-time constants of `_paged_attention_kernel` for one launch."""
    block_m, block_q = _rows(group, launch.block_m)
    return {
        "BLOCK_SIZE": block_size,
        "GROUP": group,
        "HEAD_DIM": head_dim,
        "DIM_PAD": max(triton.next_power_of_2(head_dim), 16),
        "BLOCK_M": block_m,
        "BLOCK_Q": block_q,
        "BLOCK_N": launch.block_n,
        "SPLIT": launch.num_splits > 1,
        "MIN_SPLIT_KEYS": _min_split_keys(launch),
        "ONE_PROGRAM_PER_SEQ": launch.one_program_per_seq,
        "HAS_ROWS": has_rows,
        "USE_WINDOW": has_window,
        "CAUSAL_TILING": launch.causal_tiling,
        "IEEE": dtype == torch.float32 or INTERPRETED,
        "UPCAST": INTERPRETED,
    }


def _min_split_keys(launch: AttentionLaunch) -> int:
    """launch.min_split_keys rounded up to whole tiles (splits start on tile bounds)."""
    return -(-launch.min_split_keys // launch.block_n) * launch.block_n


def merge_constants(launch: AttentionLaunch, head_dim: int, has_window: bool) -> dict[str, object]:
    """The compile-time constants of `_merge_splits_kernel` for one split launch."""
    return {
        "HEAD_DIM": head_dim,
        "DIM_PAD": triton.next_power_of_2(head_dim),
        "BLOCK_N": launch.block_n,
        "MIN_SPLIT_KEYS": _min_split_keys(launch),
        "CHUNK": MERGE_CHUNK,
        "USE_WINDOW": has_window,
    }

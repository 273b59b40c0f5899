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

A decode launch with fused_store also writes this step's k / v into the cache at their
slots (no separate store_kv launch): the split that owns a sequence's last key stores
it and attends to it from k / v, never from the slot it writes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ppruntime.kernels.dependent_launch import begin_dependent, pdl_options

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: no TMA descriptors (new_kv="descriptor" is refused)
    TensorDescriptor = None

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
    k_new,  # SOURCE 1: the new tokens' K of this KV head; SOURCE 2: K's descriptor
    v_new,
    new_row_offset,  # key position p is row p + new_row_offset of k_new / v_new
    new_column,  # SOURCE 2: this KV head's first column in the [T, Hkv * D] descriptors
    stride_k_new,
    stride_v_new,
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
    SOURCE: tl.constexpr,
    SCALED_Q: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
):
    """One BLOCK_N-key tile of the online softmax (causal tiling). Unmasked tiles hold
    keys every query row sees: no key, causal or window masks, no -inf guard.

    SOURCE 0 reads the keys from the paged cache through the block table (3: the same,
    one table lookup a block when a tile spans whole blocks); 1 and 2 read this step's
    own keys from the contiguous new k / v (pointers / TMA descriptors).
    SCALED_Q: q already holds scale * log2(e), the scores are in the log2 domain.
    LAZY_RESCALE: keep the running max (and skip rescaling the accumulator) unless a
    row's max grows by more than 2^8; the stale max only scales p and the sum alike."""
    keys = tl.arange(0, BLOCK_N)
    key_pos = tile_start + keys
    dims = tl.arange(0, DIM_PAD)
    if MASKED:
        key_valid = (key_pos >= kv_low) & (key_pos < kv_high)
    if SOURCE == 2:
        row = (tile_start + new_row_offset).to(tl.int32)  # descriptor coordinates: int32
        k = tl.trans(k_new.load([row, new_column]))  # [DIM_PAD, BLOCK_N]; zeros past T
        v = v_new.load([row, new_column])  # [BLOCK_N, DIM_PAD]
    else:
        if SOURCE == 1:
            rows = (key_pos + new_row_offset).to(tl.int64)
            k_ptrs = k_new + rows[None, :] * stride_k_new + dims[:, None]
            v_ptrs = v_new + rows[:, None] * stride_v_new + dims[None, :]
        else:
            # tile_start is a multiple of BLOCK_N: when blocks and tiles nest, the
            # block-table lookups are per block, and the offsets inside a block are the
            # same every tile
            if BLOCK_SIZE % BLOCK_N == 0:  # the tile lies inside one block: one lookup
                block_id = tl.load(table_ptr + tile_start // BLOCK_SIZE).to(tl.int64)
                in_block = tile_start % BLOCK_SIZE + keys
                key_offset = block_id * stride_cache_block + in_block * stride_cache_offset
            elif BLOCK_N % BLOCK_SIZE == 0 and SOURCE == 3:  # whole blocks, one lookup each
                tile_blocks = tl.arange(0, BLOCK_N // BLOCK_SIZE)
                block_index = tile_start // BLOCK_SIZE + tile_blocks
                if MASKED:
                    block_valid = tile_start + tile_blocks * BLOCK_SIZE < kv_high
                    block_ids = tl.load(table_ptr + block_index, mask=block_valid, other=0)
                else:
                    block_ids = tl.load(table_ptr + block_index)
                block_offset = (
                    block_ids.to(tl.int64)[:, None] * stride_cache_block
                    + tl.arange(0, BLOCK_SIZE)[None, :] * stride_cache_offset
                )  # [blocks of the tile, BLOCK_SIZE]
                key_offset = tl.reshape(block_offset, [BLOCK_N])
            elif BLOCK_N % BLOCK_SIZE == 0:  # the tile spans whole blocks
                block_index = tile_start // BLOCK_SIZE + keys // BLOCK_SIZE
                if MASKED:
                    block_ids = tl.load(table_ptr + block_index, mask=key_valid, other=0)
                else:
                    block_ids = tl.load(table_ptr + block_index)
                key_offset = (
                    block_ids.to(tl.int64) * stride_cache_block
                    + (keys % BLOCK_SIZE) * stride_cache_offset
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
            v_ptrs = k_ptr + stride_cache_kv + key_offset[:, None] + dims[None, :]
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
    if not SCALED_Q:
        score_scale = scale_log2
    else:
        score_scale = 1.0
    if MASKED:
        visible = key_valid[None, :] & (key_pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            visible = visible & (key_pos[None, :] > q_pos[:, None] - sliding_window)
        scores = tl.where(visible, scores, float("-inf"))
    if SCALED_Q:
        new_max = tl.maximum(running_max, tl.max(scores, 1))
    else:
        new_max = tl.maximum(running_max, tl.max(scores, 1) * score_scale)
    if LAZY_RESCALE:
        grows = (new_max > running_max + 8.0).to(tl.int32)
        if tl.max(grows, 0) > 0:
            if MASKED:
                target = tl.where(new_max == float("-inf"), 0.0, new_max)
            else:
                target = new_max
            rescale = tl.exp2(running_max - target)
            running_sum = running_sum * rescale
            acc = acc * rescale[:, None]
            running_max = new_max
        new_max = running_max
        if MASKED:
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        else:
            shift = new_max
        if SCALED_Q:
            probs = tl.exp2(scores - shift[:, None])
        else:
            probs = tl.exp2(scores * score_scale - shift[:, None])
        running_sum = running_sum + tl.sum(probs, 1)
    else:
        if MASKED:
            # a row that has seen no visible key yet keeps max -inf: shift by 0 instead
            shift = tl.where(new_max == float("-inf"), 0.0, new_max)
        else:
            shift = new_max
        if SCALED_Q:
            probs = tl.exp2(scores - shift[:, None])
        else:
            probs = tl.exp2(scores * score_scale - shift[:, None])  # one FMA a score
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


@triton.jit
def _attend_range(
    acc,
    running_max,
    running_sum,
    q,
    q_pos,
    range_start,
    range_end,
    kv_low,
    kv_high,
    table_ptr,
    k_ptr,
    stride_cache_kv,
    stride_cache_block,
    stride_cache_offset,
    k_new,
    v_new,
    new_row_offset,
    new_column,
    stride_k_new,
    stride_v_new,
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
    SOURCE: tl.constexpr,
    SCALED_Q: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    LOOP_STAGES: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
):
    """_attend_tile over the tiles starting at range_start, range_start + BLOCK_N, ...

    LOOP_STAGES 0 pipelines the loop with the launch's num_stages, n > 0 with n (1: not
    at all: the masked edge loops run a tile or two); WARP_SPECIALIZE asks triton to
    split the loop into producer and consumer warps."""
    if WARP_SPECIALIZE:
        for tile_start in tl.range(range_start, range_end, BLOCK_N, warp_specialize=True):
            acc, running_max, running_sum = _attend_tile(
                acc, running_max, running_sum, q, q_pos, tile_start, kv_low, kv_high,
                table_ptr, k_ptr, stride_cache_kv, stride_cache_block, stride_cache_offset,
                k_new, v_new, new_row_offset, new_column, stride_k_new, stride_v_new,
                scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM, DIM_PAD, BLOCK_N, MASKED,
                USE_WINDOW, IEEE, UPCAST, SOURCE, SCALED_Q, LAZY_RESCALE,
            )  # fmt: skip
    elif LOOP_STAGES > 0:
        for tile_start in tl.range(range_start, range_end, BLOCK_N, num_stages=LOOP_STAGES):
            acc, running_max, running_sum = _attend_tile(
                acc, running_max, running_sum, q, q_pos, tile_start, kv_low, kv_high,
                table_ptr, k_ptr, stride_cache_kv, stride_cache_block, stride_cache_offset,
                k_new, v_new, new_row_offset, new_column, stride_k_new, stride_v_new,
                scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM, DIM_PAD, BLOCK_N, MASKED,
                USE_WINDOW, IEEE, UPCAST, SOURCE, SCALED_Q, LAZY_RESCALE,
            )  # fmt: skip
    else:
        for tile_start in range(range_start, range_end, BLOCK_N):
            acc, running_max, running_sum = _attend_tile(
                acc, running_max, running_sum, q, q_pos, tile_start, kv_low, kv_high,
                table_ptr, k_ptr, stride_cache_kv, stride_cache_block, stride_cache_offset,
                k_new, v_new, new_row_offset, new_column, stride_k_new, stride_v_new,
                scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM, DIM_PAD, BLOCK_N, MASKED,
                USE_WINDOW, IEEE, UPCAST, SOURCE, SCALED_Q, LAZY_RESCALE,
            )  # fmt: skip
    return acc, running_max, running_sum


@triton.jit
def _attend_prefix_then_new(
    acc,
    running_max,
    running_sum,
    q,
    q_pos,
    first_q_index,  # the program's first query, counted from the chunk's first token
    context_len,
    first_token,
    kv_low,
    kv_high,
    kv_head,
    table_ptr,
    k_ptr,
    stride_cache_kv,
    stride_cache_block,
    stride_cache_offset,
    k_new,
    v_new,
    stride_k_new_token,
    stride_k_new_head,
    stride_v_new_token,
    stride_v_new_head,
    scale_log2,
    sliding_window,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    NEW_KV: tl.constexpr,
    SCALED_Q: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    EDGE_STAGES: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    CACHE_SOURCE: tl.constexpr,
):
    """Causal tiling in two parts: the cached prefix [kv_low, context_len) through the
    block table (tiles at multiples of BLOCK_N; every query sees every prefix key but for
    a window's lower edge, so only that edge and the prefix's last partial tile are
    masked), then the chunk's own keys [context_len, kv_high) from the contiguous new
    k / v (tiles at context_len + multiples of BLOCK_N: the plain causal self-attention
    of the chunk, unmasked below the diagonal)."""
    prefix_high = tl.minimum(context_len, kv_high)
    low = (kv_low // BLOCK_N) * BLOCK_N
    window_tiles = low  # keys from here on are in every row's window
    if USE_WINDOW:
        window_start = tl.maximum(kv_high - sliding_window, 0)  # the last row's first key
        window_tiles = tl.maximum(low, tl.cdiv(window_start, BLOCK_N) * BLOCK_N)
    if NEW_KV == 1:
        k_src = k_new + kv_head.to(tl.int64) * stride_k_new_head
        v_src = v_new + kv_head.to(tl.int64) * stride_v_new_head
    else:
        k_src = k_new
        v_src = v_new
    new_row_offset = first_token - context_len
    new_column = (kv_head * HEAD_DIM).to(tl.int32)

    # the cached prefix
    unmasked_low = tl.minimum(window_tiles, tl.cdiv(prefix_high, BLOCK_N) * BLOCK_N)
    unmasked_high = tl.maximum((prefix_high // BLOCK_N) * BLOCK_N, unmasked_low)
    acc, running_max, running_sum = _attend_range(
        acc, running_max, running_sum, q, q_pos, low, unmasked_low, kv_low, prefix_high,
        table_ptr, k_ptr, stride_cache_kv, stride_cache_block, stride_cache_offset, k_src,
        v_src, new_row_offset, new_column, stride_k_new_token, stride_v_new_token,
        scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM, DIM_PAD, BLOCK_N, True, USE_WINDOW,
        IEEE, UPCAST, CACHE_SOURCE, SCALED_Q, LAZY_RESCALE, EDGE_STAGES, False,
    )  # fmt: skip
    acc, running_max, running_sum = _attend_range(
        acc, running_max, running_sum, q, q_pos, unmasked_low, unmasked_high, kv_low,
        prefix_high, table_ptr, k_ptr, stride_cache_kv, stride_cache_block,
        stride_cache_offset, k_src, v_src, new_row_offset, new_column, stride_k_new_token,
        stride_v_new_token, scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM, DIM_PAD,
        BLOCK_N, False, USE_WINDOW, IEEE, UPCAST, CACHE_SOURCE, SCALED_Q, LAZY_RESCALE, 0,
        WARP_SPECIALIZE,
    )  # fmt: skip
    acc, running_max, running_sum = _attend_range(
        acc, running_max, running_sum, q, q_pos, unmasked_high, prefix_high, kv_low,
        prefix_high, table_ptr, k_ptr, stride_cache_kv, stride_cache_block,
        stride_cache_offset, k_src, v_src, new_row_offset, new_column, stride_k_new_token,
        stride_v_new_token, scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM, DIM_PAD,
        BLOCK_N, True, USE_WINDOW, IEEE, UPCAST, CACHE_SOURCE, SCALED_Q, LAZY_RESCALE,
        EDGE_STAGES, False,
    )  # fmt: skip

    # the chunk's own keys, in positions relative to its first token
    chunk_end = kv_high - context_len
    chunk_low = (tl.maximum(kv_low - context_len, 0) // BLOCK_N) * BLOCK_N
    chunk_window = chunk_low
    if USE_WINDOW:
        chunk_window = tl.maximum(
            chunk_low, tl.cdiv(tl.maximum(window_start - context_len, 0), BLOCK_N) * BLOCK_N
        )
        chunk_window = tl.minimum(chunk_window, tl.cdiv(chunk_end, BLOCK_N) * BLOCK_N)
    # unmasked: tiles whose keys are at or before the program's first query
    chunk_full = tl.maximum(((first_q_index + 1) // BLOCK_N) * BLOCK_N, chunk_window)
    acc, running_max, running_sum = _attend_range(
        acc, running_max, running_sum, q, q_pos, context_len + chunk_low,
        context_len + chunk_window, kv_low, kv_high, table_ptr, k_ptr, stride_cache_kv,
        stride_cache_block, stride_cache_offset, k_src, v_src, new_row_offset, new_column,
        stride_k_new_token, stride_v_new_token, scale_log2, sliding_window, BLOCK_SIZE,
        HEAD_DIM, DIM_PAD, BLOCK_N, True, USE_WINDOW, IEEE, UPCAST, NEW_KV, SCALED_Q,
        LAZY_RESCALE, EDGE_STAGES, False,
    )  # fmt: skip
    acc, running_max, running_sum = _attend_range(
        acc, running_max, running_sum, q, q_pos, context_len + chunk_window,
        context_len + chunk_full, kv_low, kv_high, table_ptr, k_ptr, stride_cache_kv,
        stride_cache_block, stride_cache_offset, k_src, v_src, new_row_offset, new_column,
        stride_k_new_token, stride_v_new_token, scale_log2, sliding_window, BLOCK_SIZE,
        HEAD_DIM, DIM_PAD, BLOCK_N, False, USE_WINDOW, IEEE, UPCAST, NEW_KV, SCALED_Q,
        LAZY_RESCALE, 0, WARP_SPECIALIZE,
    )  # fmt: skip
    acc, running_max, running_sum = _attend_range(
        acc, running_max, running_sum, q, q_pos, context_len + chunk_full, kv_high, kv_low,
        kv_high, table_ptr, k_ptr, stride_cache_kv, stride_cache_block, stride_cache_offset,
        k_src, v_src, new_row_offset, new_column, stride_k_new_token, stride_v_new_token,
        scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM, DIM_PAD, BLOCK_N, True, USE_WINDOW,
        IEEE, UPCAST, NEW_KV, SCALED_Q, LAZY_RESCALE, EDGE_STAGES, False,
    )  # fmt: skip
    return acc, running_max, running_sum


@triton.jit
def _store_new_kv(
    k_new,
    v_new,
    token,
    kv_head,
    stride_k_new_token,
    stride_k_new_head,
    stride_v_new_token,
    stride_v_new_head,
    slot_mapping_ptr,
    head_cache_ptr,  # the cache's K of this KV head; V is stride_cache_kv further
    stride_cache_kv,
    stride_cache_block,
    stride_cache_offset,
    owns_new,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
):
    """Token `token`'s k and v of this KV head [DIM_PAD], in the cache's dtype (as store_kv
    rounds them), loaded when owns_new (zeros otherwise), and written into the cache at
    the token's slot when owns_new and the slot is not -1."""
    dims = tl.arange(0, DIM_PAD)
    # masks from scalar limits (the interpreter mistypes a tensor & a scalar)
    limit = tl.where(owns_new, HEAD_DIM, 0)
    valid = dims < limit
    cache_type = head_cache_ptr.dtype.element_ty
    k_row = k_new + token * stride_k_new_token + kv_head.to(tl.int64) * stride_k_new_head
    v_row = v_new + token * stride_v_new_token + kv_head.to(tl.int64) * stride_v_new_head
    new_k = tl.load(k_row + dims, mask=valid, other=0.0).to(cache_type)
    new_v = tl.load(v_row + dims, mask=valid, other=0.0).to(cache_type)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    dest = (
        head_cache_ptr
        + (slot // BLOCK_SIZE) * stride_cache_block
        + (slot % BLOCK_SIZE) * stride_cache_offset
        + dims
    )
    stored = dims < tl.where(slot >= 0, limit, 0)
    tl.store(dest, new_k, mask=stored)
    tl.store(dest + stride_cache_kv, new_v, mask=stored)
    return new_k, new_v


@triton.jit
def _tile_block_ids(
    table_ptr, tile_start, kv_low, kv_high, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr
):
    """Each key's block id of the tile at tile_start (0 outside [kv_low, kv_high))."""
    key_pos = tile_start + tl.arange(0, BLOCK_N)
    key_valid = (key_pos >= kv_low) & (key_pos < kv_high)
    return tl.load(table_ptr + key_pos // BLOCK_SIZE, mask=key_valid, other=0)


@triton.jit
def _decode_tile(
    acc,
    running_max,
    running_sum,
    q,
    q_pos,
    tile_start,
    kv_low,
    kv_high,
    block_ids,  # _tile_block_ids of the tile
    k_ptr,  # the cache's K of this program's KV head; V is stride_cache_kv further
    stride_cache_kv,
    stride_cache_block,
    stride_cache_offset,
    scale_log2,
    sliding_window,
    new_pos,  # WITH_NEW: the key read from new_k / new_v instead of the cache (-1: none)
    new_k,  # [DIM_PAD] in the cache's dtype
    new_v,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    IEEE: tl.constexpr,
    UPCAST: tl.constexpr,
    SCALED_Q: tl.constexpr,
    WITH_NEW: tl.constexpr,
):
    """One BLOCK_N-key tile of the decode loop (every key, causal and window mask), keys
    looked up one by one through the block table. WITH_NEW: the key at new_pos comes
    from new_k / new_v (the values the fused store writes; its slot is not read)."""
    dims = tl.arange(0, DIM_PAD)
    dim_valid = dims < HEAD_DIM
    cache_type = k_ptr.dtype.element_ty
    key_pos = tile_start + tl.arange(0, BLOCK_N)
    key_valid = (key_pos >= kv_low) & (key_pos < kv_high)
    key_offset = (
        block_ids.to(tl.int64) * stride_cache_block + (key_pos % BLOCK_SIZE) * stride_cache_offset
    )
    if WITH_NEW:
        is_new = key_pos == new_pos
        cached = key_valid & (key_pos != new_pos)
    else:
        cached = key_valid
    k = tl.load(
        k_ptr + key_offset[None, :] + dims[:, None],
        mask=cached[None, :] & dim_valid[:, None],
        other=0.0,
    )  # [DIM_PAD, BLOCK_N]
    v = tl.load(
        k_ptr + stride_cache_kv + key_offset[:, None] + dims[None, :],
        mask=cached[:, None] & dim_valid[None, :],
        other=0.0,
    )  # [BLOCK_N, DIM_PAD]
    if WITH_NEW:
        k = tl.where(is_new[None, :], new_k[:, None], k)
        v = tl.where(is_new[:, None], new_v[None, :], v)
    probs_type = cache_type
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        probs_type = tl.float32
    if IEEE:
        scores = tl.dot(q, k, input_precision="ieee")
    else:
        scores = tl.dot(q, k)
    if not SCALED_Q:
        scores = scores * scale_log2
    q_pos_2d = q_pos[:, None]
    visible = key_valid[None, :] & (key_pos[None, :] <= q_pos_2d)
    if USE_WINDOW:
        visible = visible & (key_pos[None, :] > q_pos_2d - sliding_window)
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
    slot_mapping_ptr,  # [T] (STORE_NEW_KV): where each token's k / v goes; -1: nowhere
    k_new,  # NEW_KV 1 / STORE_NEW_KV: this step's k [T, Hkv, D]; NEW_KV 2: a descriptor
    v_new,
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
    stride_k_new_token,
    stride_k_new_head,
    stride_v_new_token,
    stride_v_new_head,
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
    PACK_GROUP: tl.constexpr,
    NEW_KV: tl.constexpr,
    SCALED_Q: tl.constexpr,
    LAZY_RESCALE: tl.constexpr,
    EDGE_STAGES: tl.constexpr,
    WARP_SPECIALIZE: tl.constexpr,
    CACHE_SOURCE: tl.constexpr,
    STORE_NEW_KV: tl.constexpr,
    PDL: tl.constexpr,
):
    begin_dependent(PDL)
    program = tl.program_id(0)
    if CAUSAL_TILING:
        # the last query blocks of a sequence see the most keys: start them first, so
        # that the short ones fill the tail of the grid
        program = tl.num_programs(0) - 1 - program
    if PACK_GROUP:
        kv_head = tl.program_id(1)
    else:  # one query head a program: grid dim 1 runs over the query heads
        kv_head = tl.program_id(1) // GROUP
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
    if PACK_GROUP:  # row r: token r // GROUP of the block, head r % GROUP of the group
        token_in_block = rows // GROUP
        q_head = kv_head * GROUP + rows % GROUP
    else:  # row r: token r of the block, this program's head
        token_in_block = rows
        q_head = tl.program_id(1) + rows * 0
    q_index = q_block * BLOCK_Q + token_in_block
    row_valid = (token_in_block < BLOCK_Q) & (q_index < q_len)
    q_token = (first_token + q_index).to(tl.int64)
    q_pos = context_len + q_index
    dims = tl.arange(0, DIM_PAD)
    dim_valid = dims < HEAD_DIM
    cache_type = cache_ptr.dtype.element_ty
    q = tl.load(
        q_ptr + q_token[:, None] * stride_q_token + q_head[:, None] * stride_q_head + dims[None, :],
        mask=row_valid[:, None] & dim_valid[None, :],
        other=0.0,
    )
    if SCALED_Q:  # the softmax scale (log2 domain) applied once, before the rounding
        q = q.to(tl.float32) * scale_log2
    q = q.to(cache_type)
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
    if STORE_NEW_KV:
        # decode: the sequence's one new token is its last key, position kv_high - 1. The
        # split that holds that key (split 0 of a sequence with none) writes its k / v
        # into the cache, and attends to it from registers: no program reads its slot
        if SPLIT:
            owns_new = split == tl.maximum(splits_used - 1, 0)
        else:
            owns_new = split == 0
        new_pos = tl.where(owns_new, kv_high - 1, -1)
        new_k, new_v = _store_new_kv(
            k_new, v_new, first_token.to(tl.int64), kv_head, stride_k_new_token,
            stride_k_new_head, stride_v_new_token, stride_v_new_head, slot_mapping_ptr,
            cache_ptr + kv_head.to(tl.int64) * stride_cache_head, stride_cache_kv,
            stride_cache_block, stride_cache_offset, owns_new, BLOCK_SIZE, HEAD_DIM, DIM_PAD,
        )  # fmt: skip
    if SPLIT:
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
    if CAUSAL_TILING and NEW_KV != 0:
        acc, running_max, running_sum = _attend_prefix_then_new(
            acc, running_max, running_sum, q, q_pos, q_block * BLOCK_Q, context_len,
            first_token, kv_low, kv_high, kv_head, table_ptr, cache_ptr + head_offset,
            stride_cache_kv, stride_cache_block, stride_cache_offset, k_new, v_new,
            stride_k_new_token, stride_k_new_head, stride_v_new_token, stride_v_new_head,
            scale_log2, sliding_window, BLOCK_SIZE, HEAD_DIM, DIM_PAD, BLOCK_N, USE_WINDOW,
            IEEE, UPCAST, NEW_KV, SCALED_Q, LAZY_RESCALE, EDGE_STAGES, WARP_SPECIALIZE,
            CACHE_SOURCE,
        )  # fmt: skip
    elif CAUSAL_TILING:
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
            acc, running_max, running_sum = _attend_range(
                acc, running_max, running_sum, q, q_pos, low, full_low, kv_low, kv_high,
                table_ptr, cache_ptr + head_offset, stride_cache_kv, stride_cache_block,
                stride_cache_offset, q_ptr, q_ptr, 0, 0, 0, 0, scale_log2, sliding_window,
                BLOCK_SIZE, HEAD_DIM, DIM_PAD, BLOCK_N, True, USE_WINDOW, IEEE, UPCAST,
                CACHE_SOURCE, SCALED_Q, LAZY_RESCALE, EDGE_STAGES, False,
            )  # fmt: skip
        full_high = tl.maximum(((first_pos + 1) // BLOCK_N) * BLOCK_N, full_low)
        acc, running_max, running_sum = _attend_range(
            acc, running_max, running_sum, q, q_pos, full_low, full_high, kv_low, kv_high,
            table_ptr, cache_ptr + head_offset, stride_cache_kv, stride_cache_block,
            stride_cache_offset, q_ptr, q_ptr, 0, 0, 0, 0, scale_log2, sliding_window,
            BLOCK_SIZE, HEAD_DIM, DIM_PAD, BLOCK_N, False, USE_WINDOW, IEEE, UPCAST, CACHE_SOURCE,
            SCALED_Q, LAZY_RESCALE, 0, WARP_SPECIALIZE,
        )  # fmt: skip
        acc, running_max, running_sum = _attend_range(
            acc, running_max, running_sum, q, q_pos, full_high, kv_high, kv_low, kv_high,
            table_ptr, cache_ptr + head_offset, stride_cache_kv, stride_cache_block,
            stride_cache_offset, q_ptr, q_ptr, 0, 0, 0, 0, scale_log2, sliding_window,
            BLOCK_SIZE, HEAD_DIM, DIM_PAD, BLOCK_N, True, USE_WINDOW, IEEE, UPCAST, CACHE_SOURCE,
            SCALED_Q, LAZY_RESCALE, EDGE_STAGES, False,
        )  # fmt: skip
    else:
        tiles_low = (kv_low // BLOCK_N) * BLOCK_N
        if STORE_NEW_KV:
            # the last tile (the new key's, in its owner) peeled off the loop, which does
            # not prefetch it: its block ids are looked up now, their latency hidden
            tiles_high = tl.maximum(tl.cdiv(kv_high, BLOCK_N) * BLOCK_N - BLOCK_N, tiles_low)
            last_block_ids = _tile_block_ids(
                table_ptr, tiles_high, kv_low, kv_high, BLOCK_SIZE, BLOCK_N
            )
        else:
            tiles_high = kv_high
        for tile_start in range(tiles_low, tiles_high, BLOCK_N):
            block_ids = _tile_block_ids(table_ptr, tile_start, kv_low, kv_high, BLOCK_SIZE, BLOCK_N)
            acc, running_max, running_sum = _decode_tile(
                acc, running_max, running_sum, q, q_pos, tile_start, kv_low, kv_high,
                block_ids, cache_ptr + head_offset, stride_cache_kv, stride_cache_block,
                stride_cache_offset, scale_log2, sliding_window, -1, q, q, BLOCK_SIZE,
                HEAD_DIM, DIM_PAD, BLOCK_N, USE_WINDOW, IEEE, UPCAST, SCALED_Q, False,
            )  # fmt: skip
        if STORE_NEW_KV:  # noqa: SIM102 (a compile-time branch around a run-time one)
            if kv_low < kv_high:  # (a padded row has no keys)
                acc, running_max, running_sum = _decode_tile(
                    acc, running_max, running_sum, q, q_pos, tiles_high, kv_low, kv_high,
                    last_block_ids, cache_ptr + head_offset, stride_cache_kv, stride_cache_block,
                    stride_cache_offset, scale_log2, sliding_window, new_pos, new_k, new_v,
                    BLOCK_SIZE, HEAD_DIM, DIM_PAD, BLOCK_N, USE_WINDOW, IEEE, UPCAST, SCALED_Q,
                    True,
                )  # fmt: skip

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
    PDL: tl.constexpr,
):
    begin_dependent(PDL)
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
    pack_group: a program's rows are BLOCK_Q tokens x the GROUP query heads of one KV
        head (each K/V tile loaded once for the group); False: BLOCK_M tokens of one
        query head (the group's programs share the K/V tiles through the L2).
    new_kv: where causal tiling reads the keys of a sequence's own new tokens: "cache"
        (the paged cache, as every other key), "pointer" (the contiguous k / v given to
        `paged_attention`, plain loads) or "descriptor" (the same through TMA tensor
        descriptors, sm_90+); the cached prefix is always read through the block table.
    scaled_q: multiply q by scale * log2(e) once (scores come out in the log2 domain).
    lazy_rescale: rescale the accumulator only when a row's max grows by more than 2^8.
    edge_stages: pipeline stages of causal tiling's masked loops (the diagonal, a window's
        edge, a prefix's last tile: a tile or two each); 0: num_stages, as the others.
    warp_specialize: triton's warp specialisation of the unmasked loops.
    table_per_block: causal tiling's cache tiles that span whole blocks look each block up
        once (BLOCK_N // block_size loads) instead of once a key.
    fused_store: decode-only launches: the launch writes this step's k / v into the cache
        at `paged_attention`'s slot_mapping itself (no `store_kv` launch before it); the
        new key is read from k_new / v_new, through the loop's last tile peeled off.
    """

    block_m: int
    block_n: int
    one_program_per_seq: bool = False
    num_splits: int = 1
    min_split_keys: int = 0  # fewest keys a split takes (a short context uses fewer splits)
    num_warps: int = 4
    num_stages: int = 2
    causal_tiling: bool = False
    pack_group: bool = True
    new_kv: str = "cache"
    scaled_q: bool = False
    lazy_rescale: bool = False
    edge_stages: int = 0
    warp_specialize: bool = False
    table_per_block: bool = False
    fused_store: bool = False


NEW_KV_SOURCES = {"cache": 0, "pointer": 1, "descriptor": 2}


def _rows(group: int, block_m: int, pack_group: bool = True) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_Q): at least `block_m` rows, and whole query-head groups."""
    if not pack_group:
        block_m = max(block_m, 16)
        return block_m, block_m
    block_m = max(block_m, triton.next_power_of_2(group), 16)
    return block_m, block_m // group


PREFILL_KERNEL_ENV = "PPRUNTIME_TRITON_PREFILL"
# candidate prefill kernels beside "tiled" (the default) and "legacy": the causal-tiled
# kernel with these AttentionLaunch fields changed (scripts/sweep_prefill_attention.py
# times them and their tile / warp / stage configurations on the GPU)
PREFILL_VARIANTS: dict[str, dict[str, object]] = {
    "tiled": {},
    "new-kv-tma": {"new_kv": "descriptor", "edge_stages": 1},
    "head-new-kv-tma": {"pack_group": False, "new_kv": "descriptor", "edge_stages": 1},
    "new-kv-tma-lazy": {"new_kv": "descriptor", "edge_stages": 1, "lazy_rescale": True},
    "tiled-edge1": {"edge_stages": 1},
    "tiled-table": {"table_per_block": True},
    "new-kv-tma-table": {"new_kv": "descriptor", "edge_stages": 1, "table_per_block": True},
    "head": {"pack_group": False},
    "lazy": {"lazy_rescale": True},
    "new-kv": {"new_kv": "pointer", "edge_stages": 1},
    "scaled-q": {"scaled_q": True},
    "new-kv-tma-ws": {"new_kv": "descriptor", "edge_stages": 1, "warp_specialize": True},
}
# the fastest on the H200 (scripts/sweep_prefill_attention.py, 4096-token prefill: 47.8 %
# of the matmul peak against 36.3 % for "tiled" at the same 128 x 128 x 3-stage tiles)
DEFAULT_PREFILL_KERNEL = "new-kv-tma-table"
PREFILL_KERNELS = ("tiled", "legacy", *(name for name in PREFILL_VARIANTS if name != "tiled"))


def prefill_kernel_from_env() -> str:
    """$PPRUNTIME_TRITON_PREFILL (default DEFAULT_PREFILL_KERNEL); ValueError naming a bad
    value."""
    kernel = os.environ.get(PREFILL_KERNEL_ENV) or DEFAULT_PREFILL_KERNEL
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

    kernel: DEFAULT_PREFILL_KERNEL, "tiled", "legacy" (the all-masked loop with 64-key tiles, kept
    for comparison) or one of PREFILL_VARIANTS (candidates, tiled with other fields);
    None reads $PPRUNTIME_TRITON_PREFILL.
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
    features = PREFILL_VARIANTS[kernel]
    rows_per_token = group if features.get("pack_group", True) else 1
    if dtype == torch.float32:
        return AttentionLaunch(block_m=32, block_n=32, causal_tiling=True, **features)
    if max_query_len * rows_per_token >= 128:
        # 128 x 128 tiles halve the per-tile costs (rescaling the [128, D] accumulator,
        # row reductions, barriers) a key against 128 x 64; three stages measured faster
        # than two for every variant on the H200 (tiled: 36.3 % against 33.0 %)
        return AttentionLaunch(
            block_m=128, block_n=128, num_warps=8, num_stages=3, causal_tiling=True, **features
        )
    return AttentionLaunch(block_m=64, block_n=64, causal_tiling=True, **features)


def decode_launch(
    num_seqs: int,
    num_kv_heads: int,
    max_context_len: int,
    target_programs: int,
    block_n: int | None = None,
    min_keys_per_split: int = 256,
    max_splits: int = 128,
    head_dim: int = 128,
    fused_store: bool = True,
) -> AttentionLaunch:
    """Split each sequence's keys so that about `target_programs` programs run at once,
    but no more splits than a `max_context_len` context fills with `min_keys_per_split`.
    fused_store: the launch stores this step's k / v itself (AttentionLaunch.fused_store).

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
        fused_store=fused_store,
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
    k_new: torch.Tensor | None = None,
    v_new: torch.Tensor | None = None,
    slot_mapping: torch.Tensor | None = None,
) -> torch.Tensor:
    """q [T, Hq, D] against the paged cache [2, NB, BS, Hkv, D] -> [T, Hq, D] in q's dtype.

    Sequence b owns tokens [query_start_loc[b], query_start_loc[b + 1]) and has
    seq_lens[b] keys in all (cached prefix + its new tokens, already stored); its
    blocks are row b (or block_table_rows[b]) of block_table. float32 inputs use
    IEEE-precision dots. No host synchronisation.

    k_new, v_new [T, Hkv, D]: this step's keys and values (already stored in the cache),
    read from there instead of the cache when launch.new_kv is not "cache".

    slot_mapping [T] (launch.fused_store, decode-only): the launch itself stores k_new /
    v_new into the cache at these slots (-1: nothing), bit for bit as `store_kv` would,
    instead of a `store_kv` before it; each token's own key is then read from k_new /
    v_new. Other launches take no slot_mapping (the cache holds this step's keys).
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
    block_q = _rows(group, launch.block_m, launch.pack_group)[1]
    num_splits = launch.num_splits
    if launch.one_program_per_seq:
        grid = (num_seqs, num_kv_heads, num_splits)
    else:
        if num_splits != 1:
            raise ValueError("split-KV attention needs a decode-only launch")
        heads = num_kv_heads if launch.pack_group else num_q_heads
        grid = (num_tokens // block_q + num_seqs, heads, 1)
    if launch.causal_tiling and launch.one_program_per_seq:
        raise ValueError("causal_tiling is for mixed / prefill launches, not decode-only ones")
    if not launch.pack_group and launch.one_program_per_seq:
        raise ValueError("pack_group=False is for mixed / prefill launches, not decode-only ones")
    if launch.fused_store:
        k_source, v_source, new_strides = _stored_kv_sources(
            launch, q, k_new, v_new, slot_mapping, num_kv_heads
        )
    elif slot_mapping is not None:
        raise ValueError(
            "slot_mapping is for fused_store launches; this launch reads a cache that "
            "store_kv has written"
        )
    else:
        k_source, v_source, new_strides = _new_kv_sources(launch, q, k_new, v_new, group)
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
        slot_mapping if slot_mapping is not None else seq_lens,
        k_source,
        v_source,
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
        *new_strides,
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
        **pdl_options(q.device),
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
            **pdl_options(q.device),
        )
    return out


def _new_kv_sources(
    launch: AttentionLaunch,
    q: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    group: int,
) -> tuple[object, object, tuple[int, int, int, int]]:
    """The kernel's (k_new, v_new, their token / head strides) for launch.new_kv."""
    if launch.new_kv not in NEW_KV_SOURCES:
        raise ValueError(f"new_kv={launch.new_kv!r}: use one of {', '.join(NEW_KV_SOURCES)}")
    if launch.new_kv == "cache":
        return q, q, (0, 0, 0, 0)
    if not launch.causal_tiling:
        raise ValueError(f"new_kv={launch.new_kv!r} needs causal_tiling")
    strides = _new_kv_strides(f"new_kv={launch.new_kv!r}", q, k_new, v_new)
    num_tokens, num_kv_heads, head_dim = k_new.shape
    if launch.new_kv == "pointer":
        return k_new, v_new, strides
    if TensorDescriptor is None:
        raise ValueError("new_kv='descriptor' needs triton.tools.tensor_descriptor (triton >= 3.4)")
    if k_new.stride(1) != head_dim or v_new.stride(1) != head_dim:
        raise ValueError("new_kv='descriptor' needs each token's KV heads side by side")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x.data_ptr() % 16 or (x.stride(0) * x.element_size()) % 16:
            raise ValueError(
                f"new_kv='descriptor' needs {name} 16-byte aligned, its token stride too "
                f"(stride {x.stride(0)} x {x.element_size()} bytes)"
            )
    dim_pad = max(triton.next_power_of_2(head_dim), 16)
    block = [launch.block_n, dim_pad]
    # [T, Hkv * D] views; a box past a head's D columns reads the next head's (zeros past
    # the last), which meet q's zero padding in QK^T and land in unstored output columns
    descriptors = tuple(
        TensorDescriptor(x, [num_tokens, num_kv_heads * head_dim], [x.stride(0), 1], block)
        for x in (k_new, v_new)
    )
    return descriptors[0], descriptors[1], (0, 0, 0, 0)


def _new_kv_strides(
    what: str, q: torch.Tensor, k_new: torch.Tensor | None, v_new: torch.Tensor | None
) -> tuple[int, int, int, int]:
    """k_new / v_new's token and head strides, after checking their shapes; `what` names
    the feature that needs them in the error."""
    if k_new is None or v_new is None:
        raise ValueError(f"{what} needs this step's k_new and v_new")
    if v_new.shape != k_new.shape or k_new.shape[0] != q.shape[0] or k_new.shape[2] != q.shape[2]:
        raise ValueError(
            f"k_new {tuple(k_new.shape)} and v_new {tuple(v_new.shape)} must both be "
            f"[{q.shape[0]}, Hkv, {q.shape[2]}]"
        )
    if k_new.stride(-1) != 1 or v_new.stride(-1) != 1:
        raise ValueError("k_new and v_new must be contiguous in their last (head_dim) dimension")
    return (k_new.stride(0), k_new.stride(1), v_new.stride(0), v_new.stride(1))


def _stored_kv_sources(
    launch: AttentionLaunch,
    q: torch.Tensor,
    k_new: torch.Tensor | None,
    v_new: torch.Tensor | None,
    slot_mapping: torch.Tensor | None,
    num_kv_heads: int,
) -> tuple[object, object, tuple[int, int, int, int]]:
    """The kernel's (k_new, v_new, their strides) when the launch stores them (decode)."""
    if not launch.one_program_per_seq:
        raise ValueError(
            "fused_store needs a decode-only launch (one_program_per_seq); store mixed "
            "batches with store_kv first"
        )
    strides = _new_kv_strides("fused_store", q, k_new, v_new)
    if k_new.shape[1] != num_kv_heads:
        raise ValueError(
            f"k_new and v_new have {k_new.shape[1]} KV heads, the cache {num_kv_heads}"
        )
    if slot_mapping is None:
        raise ValueError("fused_store needs this step's slot_mapping")
    if tuple(slot_mapping.shape) != (q.shape[0],):
        raise ValueError(
            f"slot_mapping {tuple(slot_mapping.shape)} must be [{q.shape[0]}], a slot a token"
        )
    return k_new, v_new, strides


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
    block_m, block_q = _rows(group, launch.block_m, launch.pack_group)
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
        "PACK_GROUP": launch.pack_group,
        "NEW_KV": NEW_KV_SOURCES[launch.new_kv],
        "SCALED_Q": launch.scaled_q,
        "LAZY_RESCALE": launch.lazy_rescale,
        "EDGE_STAGES": launch.edge_stages,
        "WARP_SPECIALIZE": launch.warp_specialize,
        "CACHE_SOURCE": 3 if launch.table_per_block else 0,
        "STORE_NEW_KV": launch.fused_store,
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

"""Gumbel-max sampling over 1024-wide vocabulary blocks, with counter-based noise.

One program per (row, vocabulary block): it hashes (row key, token id) into a uniform,
turns it into Gumbel noise, adds it to the row's filtered scores and keeps the block's
maximum and its index (lowest index on ties). The global argmax over the blocks is a
small torch op after the kernel. Rows whose flag is 0 (greedy rows) get no noise.

The noise is a pure function of (row key, token id): the same bits as
ppruntime.stage.device_sampler.gumbel_noise, which is this kernel's reference.

`greedy_sample` is the all-greedy step's two kernels: the same blocks, no noise, any
float dtype, a flag per block that holds a NaN or a +inf (a row whose logits are not
finite comes back with a NaN maximum, as torch's argmax + gather report it), then one
program a row reducing its blocks into one packed [2, N] int32 tensor (token ids, the
maxima's float32 bits): no torch call in between, and the packed tensor is what travels
to the host.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppruntime.kernels.dependent_launch import begin_dependent, pdl_options

VOCAB_BLOCK = 1024


@triton.jit
def _mix32(x):
    # the two-round 32-bit integer hash of ppruntime.stage.device_sampler.mix32
    x = x ^ (x >> 16)
    x = x * 0x21F0AAAD
    x = x ^ (x >> 15)
    x = x * 0x735A2D97
    return x ^ (x >> 15)


@triton.jit
def _gumbel_block_argmax_kernel(
    scores_ptr,
    score_row_stride,
    key_a_ptr,
    key_b_ptr,
    noisy_ptr,
    block_max_ptr,
    block_arg_ptr,
    vocab,
    num_blocks,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    begin_dependent(PDL)
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    in_vocab = cols < vocab
    scores = tl.load(
        scores_ptr + row * score_row_stride + cols, mask=in_vocab, other=-float("inf")
    ).to(tl.float32)
    if tl.load(noisy_ptr + row) != 0:
        key_a = tl.load(key_a_ptr + row).to(tl.uint32)
        key_b = tl.load(key_b_ptr + row).to(tl.uint32)
        bits = _mix32(_mix32(cols.to(tl.uint32) ^ key_a) + key_b)
        # 23 random bits -> uniform in (0, 1), never 0 or 1 in float32
        uniform = ((bits >> 9).to(tl.float32) + 0.5) * (1.0 / 8388608.0)
        scores = scores - tl.log(-tl.log(uniform))
    best, index = tl.max(scores, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(block_max_ptr + row * num_blocks + block, best)
    tl.store(block_arg_ptr + row * num_blocks + block, (block * BLOCK + index).to(tl.int64))


def gumbel_argmax(
    scores: torch.Tensor, key_a: torch.Tensor, key_b: torch.Tensor, noisy: torch.Tensor
) -> torch.Tensor:
    """argmax(scores + Gumbel(key, token id)) per row; rows with noisy == 0: argmax(scores).

    scores [N, V] float32 (masked tokens at -inf), key_a/key_b [N] int64 (< 2**32),
    noisy [N] int32. Returns [N] int64; ties go to the lowest token id.
    """
    num_rows, vocab = scores.shape
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    num_blocks = triton.cdiv(vocab, VOCAB_BLOCK)
    block_max = torch.empty((num_rows, num_blocks), dtype=torch.float32, device=scores.device)
    block_arg = torch.empty((num_rows, num_blocks), dtype=torch.int64, device=scores.device)
    if num_rows:
        _gumbel_block_argmax_kernel[(num_rows, num_blocks)](
            scores,
            scores.stride(0),
            key_a,
            key_b,
            noisy,
            block_max,
            block_arg,
            vocab,
            num_blocks,
            BLOCK=VOCAB_BLOCK,
            **pdl_options(scores.device),
        )
    best_block = block_max.argmax(dim=1, keepdim=True)  # first maximum: lowest block
    return block_arg.gather(1, best_block).squeeze(1)


@triton.jit
def _block_argmax_kernel(
    logits_ptr,
    row_stride,
    block_max_ptr,
    block_arg_ptr,
    block_bad_ptr,
    vocab,
    num_blocks,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    begin_dependent(PDL)
    row = tl.program_id(0).to(tl.int64)
    block = tl.program_id(1)
    cols = block * BLOCK + tl.arange(0, BLOCK)
    in_vocab = cols < vocab
    values = tl.load(logits_ptr + row * row_stride + cols, mask=in_vocab, other=-float("inf")).to(
        tl.float32
    )
    bad = (values != values) | (values == float("inf"))  # NaN or +inf
    best, index = tl.max(values, axis=0, return_indices=True, return_indices_tie_break_left=True)
    tl.store(block_max_ptr + row * num_blocks + block, best)
    tl.store(block_arg_ptr + row * num_blocks + block, (block * BLOCK + index).to(tl.int64))
    tl.store(block_bad_ptr + row * num_blocks + block, tl.max(bad.to(tl.int32), axis=0))


@triton.jit
def _pick_block_kernel(
    block_max_ptr,
    block_arg_ptr,
    block_bad_ptr,
    out_ptr,
    num_rows,
    num_blocks,
    BLOCKS: tl.constexpr,
    PDL: tl.constexpr,
):
    # one program per row: the first block holding the row's maximum gives its token
    begin_dependent(PDL)
    row = tl.program_id(0)
    offsets = tl.arange(0, BLOCKS)
    valid = offsets < num_blocks
    base = row.to(tl.int64) * num_blocks
    maxima = tl.load(block_max_ptr + base + offsets, mask=valid, other=-float("inf"))
    best, index = tl.max(maxima, axis=0, return_indices=True, return_indices_tie_break_left=True)
    token = tl.load(block_arg_ptr + base + index)
    bad = tl.max(tl.load(block_bad_ptr + base + offsets, mask=valid, other=0), axis=0)
    best = tl.where(bad > 0, float("nan"), best)
    tl.store(out_ptr + row, token.to(tl.int32))
    tl.store(out_ptr + num_rows + row, best.to(tl.int32, bitcast=True))


def greedy_sample(logits: torch.Tensor) -> torch.Tensor:
    """The all-greedy step, packed: [2, N] int32, row 0 the argmax of each row of logits [N, V]
    (any float dtype; ties: the lowest id), row 1 the float32 bits of its maximum (NaN
    when the row holds a NaN or a +inf: its token is then meaningless)."""
    num_rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    num_blocks = triton.cdiv(vocab, VOCAB_BLOCK)
    device = logits.device
    block_max = torch.empty((num_rows, num_blocks), dtype=torch.float32, device=device)
    block_arg = torch.empty((num_rows, num_blocks), dtype=torch.int64, device=device)
    block_bad = torch.empty((num_rows, num_blocks), dtype=torch.int32, device=device)
    packed = torch.empty((2, num_rows), dtype=torch.int32, device=device)
    if num_rows:
        _block_argmax_kernel[(num_rows, num_blocks)](
            logits,
            logits.stride(0),
            block_max,
            block_arg,
            block_bad,
            vocab,
            num_blocks,
            BLOCK=VOCAB_BLOCK,
            **pdl_options(device),
        )
        _pick_block_kernel[(num_rows,)](
            block_max,
            block_arg,
            block_bad,
            packed,
            num_rows,
            num_blocks,
            BLOCKS=triton.next_power_of_2(num_blocks),
            **pdl_options(device),
        )
    return packed

"""KV store: write the new tokens' k, v into the paged cache at their slots.

Cache layout [2 (k, v), num_blocks, block_size, Hkv, D]; slot = block * block_size +
offset. A slot of -1 (a padded token) writes nothing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppruntime.kernels.dependent_launch import begin_dependent, pdl_options


@triton.jit
def _kv_store_kernel(
    k_ptr,
    v_ptr,
    cache_ptr,
    slot_ptr,
    num_kv_heads,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_cache_kv,
    stride_cache_block,
    stride_cache_offset,
    stride_cache_head,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    DIM_PAD: tl.constexpr,
    PDL: tl.constexpr,
):
    begin_dependent(PDL)
    token = tl.program_id(0).to(tl.int64)
    slot = tl.load(slot_ptr + token).to(tl.int64)
    if slot < 0:
        return
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    heads = tl.arange(0, HEADS_PAD)
    dims = tl.arange(0, DIM_PAD)
    mask = (heads < num_kv_heads)[:, None] & (dims < HEAD_DIM)[None, :]
    k = tl.load(
        k_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :], mask=mask
    )
    v = tl.load(
        v_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :], mask=mask
    )
    dest = (
        cache_ptr
        + block * stride_cache_block
        + offset * stride_cache_offset
        + heads[:, None] * stride_cache_head
        + dims[None, :]
    )
    element = cache_ptr.dtype.element_ty
    tl.store(dest, k.to(element), mask=mask)
    tl.store(dest + stride_cache_kv, v.to(element), mask=mask)


def store_kv(
    k: torch.Tensor, v: torch.Tensor, layer_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """k, v [T, Hkv, D] into layer_cache [2, NB, BS, Hkv, D] at slot_mapping [T] (-1: skip)."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    if k.stride(-1) != 1:
        k = k.contiguous()
    if v.stride(-1) != 1:
        v = v.contiguous()
    if layer_cache.stride(-1) != 1:
        raise ValueError("layer_cache must be contiguous in its last (head_dim) dimension")
    _kv_store_kernel[(num_tokens,)](
        k,
        v,
        layer_cache,
        slot_mapping,
        num_kv_heads,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        layer_cache.stride(0),
        layer_cache.stride(1),
        layer_cache.stride(2),
        layer_cache.stride(3),
        BLOCK_SIZE=layer_cache.shape[2],
        HEAD_DIM=head_dim,
        HEADS_PAD=triton.next_power_of_2(num_kv_heads),
        DIM_PAD=triton.next_power_of_2(head_dim),
        **pdl_options(k.device),
    )

"""Rotary embedding (rotate-half convention) applied in place to the q and k columns of a
merged qkv tensor, optionally after a per-head RMSNorm of q and k (Qwen3)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppruntime.kernels.dependent_launch import begin_dependent, pdl_options


@triton.jit
def _norm_rope_heads(
    base_ptr,
    num_heads,
    cos,  # [1, BLOCK_HALF] float32
    sin,
    norm_weight_ptr,
    eps,
    QK_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    half: tl.constexpr = HEAD_DIM // 2
    heads = tl.arange(0, BLOCK_H)
    offsets = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (offsets[None, :] < half)
    first_ptr = base_ptr + heads[:, None] * HEAD_DIM + offsets[None, :]
    x1 = tl.load(first_ptr, mask=mask, other=0.0)
    x2 = tl.load(first_ptr + half, mask=mask, other=0.0)
    dtype = x1.dtype
    if QK_NORM:
        a = x1.to(tl.float32)
        b = x2.to(tl.float32)
        variance = (tl.sum(a * a, axis=1) + tl.sum(b * b, axis=1)) / HEAD_DIM
        inverse = tl.rsqrt(variance + eps)[:, None]
        weight_mask = offsets < half
        w1 = tl.load(norm_weight_ptr + offsets, mask=weight_mask, other=0.0)
        w2 = tl.load(norm_weight_ptr + half + offsets, mask=weight_mask, other=0.0)
        # as RMSNorm: normalised value cast to the dtype, then times the weight, cast again
        x1 = ((a * inverse).to(dtype).to(tl.float32) * w1.to(tl.float32)[None, :]).to(dtype)
        x2 = ((b * inverse).to(dtype).to(tl.float32) * w2.to(tl.float32)[None, :]).to(dtype)
    a = x1.to(tl.float32)
    b = x2.to(tl.float32)
    tl.store(first_ptr, (a * cos - b * sin).to(dtype), mask=mask)
    tl.store(first_ptr + half, (b * cos + a * sin).to(dtype), mask=mask)


@triton.jit
def _qk_norm_rope_kernel(
    qkv_ptr,
    cos_ptr,
    sin_ptr,
    q_norm_ptr,
    k_norm_ptr,
    qkv_row_stride,
    cos_row_stride,
    sin_row_stride,
    num_q_heads,
    num_kv_heads,
    eps,
    QK_NORM: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HKV: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    PDL: tl.constexpr,
):
    begin_dependent(PDL)
    token = tl.program_id(0).to(tl.int64)
    offsets = tl.arange(0, BLOCK_HALF)
    in_half = offsets < HEAD_DIM // 2
    cos = tl.load(cos_ptr + token * cos_row_stride + offsets, mask=in_half, other=0.0)
    sin = tl.load(sin_ptr + token * sin_row_stride + offsets, mask=in_half, other=0.0)
    cos = cos.to(tl.float32)[None, :]
    sin = sin.to(tl.float32)[None, :]
    row_ptr = qkv_ptr + token * qkv_row_stride
    _norm_rope_heads(
        row_ptr, num_q_heads, cos, sin, q_norm_ptr, eps, QK_NORM, HEAD_DIM, BLOCK_HQ, BLOCK_HALF
    )
    _norm_rope_heads(
        row_ptr + num_q_heads * HEAD_DIM,
        num_kv_heads,
        cos,
        sin,
        k_norm_ptr,
        eps,
        QK_NORM,
        HEAD_DIM,
        BLOCK_HKV,
        BLOCK_HALF,
    )


def qk_norm_rope_(
    qkv: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_dim: int,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    eps: float = 1e-6,
) -> None:
    """Rotate the q and k heads of qkv [T, (Hq + 2 Hkv) * D] in place; v is left alone.

    cos, sin: [T, D / 2] (the angles of each token's position, float32 preferred).
    With q_norm_weight and k_norm_weight [D], each q and k head is RMS-normalised first.
    """
    width = (num_q_heads + 2 * num_kv_heads) * head_dim
    if qkv.dim() != 2 or qkv.shape[1] != width or qkv.stride(-1) != 1:
        raise ValueError(
            f"qkv must be [T, {width}] with a contiguous last dimension, got shape "
            f"{list(qkv.shape)} strides {list(qkv.stride())}"
        )
    if head_dim % 2:
        raise ValueError(f"rotary embedding needs an even head_dim, got {head_dim}")
    num_tokens = qkv.shape[0]
    for name, table in (("cos", cos), ("sin", sin)):
        if table.dim() != 2 or table.shape[0] != num_tokens or table.shape[1] < head_dim // 2:
            raise ValueError(
                f"{name} must be [{num_tokens}, {head_dim // 2}], got {list(table.shape)}"
            )
        if table.stride(-1) != 1:
            raise ValueError(f"{name} needs a contiguous last dimension")
    qk_norm = q_norm_weight is not None
    if qk_norm != (k_norm_weight is not None):
        raise ValueError("q_norm_weight and k_norm_weight go together")
    if num_tokens == 0:
        return
    _qk_norm_rope_kernel[(num_tokens,)](
        qkv,
        cos,
        sin,
        q_norm_weight if qk_norm else qkv,
        k_norm_weight if qk_norm else qkv,
        qkv.stride(0),
        cos.stride(0),
        sin.stride(0),
        num_q_heads,
        num_kv_heads,
        eps,
        QK_NORM=qk_norm,
        HEAD_DIM=head_dim,
        # tiles of at least 2 x 2: one head (MQA) or head_dim 2 still get a 2-D tile
        BLOCK_HQ=max(2, triton.next_power_of_2(num_q_heads)),
        BLOCK_HKV=max(2, triton.next_power_of_2(num_kv_heads)),
        BLOCK_HALF=max(2, triton.next_power_of_2(head_dim // 2)),
        num_warps=4,
        **pdl_options(qkv.device),
    )

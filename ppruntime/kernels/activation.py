"""SiLU-and-multiply on a merged gate_up tensor: silu(gate) * up."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ppruntime.kernels.dependent_launch import begin_dependent, pdl_options

_BLOCK = 1024


@triton.jit
def silu_mul(gate, up):
    """silu(gate) * up, rounded as torch's F.silu(gate) * up: silu in fp32 rounded to up's
    dtype, the product in fp32 rounded to up's dtype. The skinny GEMM's fused A-operand
    load calls this too, so its operand is bitwise this kernel's output."""
    gate32 = gate.to(tl.float32)
    silu = (gate32 / (1.0 + tl.exp(-gate32))).to(up.dtype)
    return (silu.to(tl.float32) * up.to(tl.float32)).to(up.dtype)


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    in_row_stride,
    out_row_stride,
    inner,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):
    begin_dependent(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inner
    gate = tl.load(gate_up_ptr + row * in_row_stride + cols, mask=mask, other=0.0)
    up = tl.load(gate_up_ptr + row * in_row_stride + inner + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * out_row_stride + cols, silu_mul(gate, up), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """gate_up [T, 2 * I] (gate first, then up) -> silu(gate) * up [T, I]."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"gate_up must be [T, 2 * I], got shape {list(gate_up.shape)}")
    if gate_up.stride(-1) != 1:
        gate_up = gate_up.contiguous()
    num_tokens, inner = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty((num_tokens, inner), dtype=gate_up.dtype, device=gate_up.device)
    if num_tokens > 0:
        block = min(_BLOCK, triton.next_power_of_2(inner))
        grid = (num_tokens, triton.cdiv(inner, block))
        _silu_and_mul_kernel[grid](
            gate_up,
            out,
            gate_up.stride(0),
            out.stride(0),
            inner,
            BLOCK=block,
            num_warps=4,
            **pdl_options(gate_up.device),
        )
    return out

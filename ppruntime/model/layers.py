"""Decoder building blocks: RMSNorm, attention block, gated MLP, decoder layer.

Parameters are created uninitialised (torch.empty): weights come from a checkpoint or
from a preset's generator. Parameter names follow Hugging Face's checkpoint names.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ppruntime.model.attention import AttentionMetadata
from ppruntime.model.backends.base import LayerAttention
from ppruntime.model.config import ModelConfig
from ppruntime.model.rope import apply_rope


def _empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b), with uninitialised weight [out, in]."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device
    ) -> None:
        super().__init__()
        self.weight = _empty(out_features, in_features, dtype=dtype, device=device)
        self.bias = _empty(out_features, dtype=dtype, device=device) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class RMSNorm(nn.Module):
    """Normalise in float32, cast back, then scale (as Hugging Face Llama)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device) -> None:
        super().__init__()
        self.weight = _empty(size, dtype=dtype, device=device)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        x32 = x.to(torch.float32)
        variance = x32.pow(2).mean(-1, keepdim=True)
        x32 = x32 * torch.rsqrt(variance + self.eps)
        return self.weight * x32.to(input_dtype)


class SelfAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = config.sliding_window_for_layer(layer_index)
        bias = config.attention_bias
        self.q_proj = Linear(hidden, self.num_heads * head_dim, bias, dtype, device)
        self.k_proj = Linear(hidden, self.num_kv_heads * head_dim, bias, dtype, device)
        self.v_proj = Linear(hidden, self.num_kv_heads * head_dim, bias, dtype, device)
        self.o_proj = Linear(
            self.num_heads * head_dim, hidden, config.attention_output_bias, dtype, device
        )
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype, device)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype, device)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        hidden: torch.Tensor,  # [T, H]
        rope: tuple[torch.Tensor, torch.Tensor],  # cos, sin: [T, D]
        attn: AttentionMetadata,
        attention: LayerAttention,
        layer_cache: torch.Tensor,  # [2, NB, BS, Hkv, D]
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        q = self.q_proj(hidden).view(num_tokens, self.num_heads, self.head_dim)
        k = self.k_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        v = self.v_proj(hidden).view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = rope
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = attention(q, k, v, layer_cache, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        bias = config.mlp_bias
        self.gate_proj = Linear(hidden, inner, bias, dtype, device)
        self.up_proj = Linear(hidden, inner, bias, dtype, device)
        self.down_proj = Linear(inner, hidden, bias, dtype, device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int, dtype: torch.dtype, device) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.self_attn = SelfAttention(config, layer_index, dtype, device)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, device)
        self.mlp = GatedMLP(config, dtype, device)

    def forward(
        self,
        hidden: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attn: AttentionMetadata,
        attention: LayerAttention,
        layer_cache: torch.Tensor,
    ) -> torch.Tensor:
        attended = self.self_attn(self.input_layernorm(hidden), rope, attn, attention, layer_cache)
        hidden = hidden + attended
        return hidden + self.mlp(self.post_attention_layernorm(hidden))

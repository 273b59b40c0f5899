"""Decoder building blocks: RMSNorm, attention block, gated MLP, decoder layer.

Parameters are created uninitialised (torch.empty): weights come from a checkpoint or
from a preset's generator. Projections of the same input are merged (q/k/v into
`qkv_proj`, gate/up into `gate_up_proj`) so that each is one matmul;
`DecoderLayer.checkpoint_tensors` maps each Hugging Face tensor name to the rows of the
merged parameter it fills. The math between the matmuls and attention goes through a
LayerOps (ppruntime.model.layer_ops).

The residual stream is carried beside the hidden state: a layer takes (hidden, residual)
and returns the branch output with the residual it has not yet been added to, so every
residual add is fused into the next RMSNorm.
"""

from __future__ import annotations

import torch
from torch import nn

from ppruntime.model.attention import AttentionMetadata
from ppruntime.model.backends.base import LayerAttention
from ppruntime.model.config import ModelConfig
from ppruntime.model.layer_ops import LayerOps, RopeTables


def _empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> nn.Parameter:
    return nn.Parameter(torch.empty(shape, dtype=dtype, device=device), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b), with uninitialised weight [out, in], computed by `ops.linear`."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        dtype: torch.dtype,
        device,
        ops: LayerOps,
    ) -> None:
        super().__init__()
        self.weight = _empty(out_features, in_features, dtype=dtype, device=device)
        self.bias = _empty(out_features, dtype=dtype, device=device) if bias else None
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.linear(x, self.weight, self.bias)


class MergedLinear(Linear):
    """Several checkpoint projections of one input as one matmul: their weights (and
    biases) stacked by rows in the order of `parts` (checkpoint module name -> rows)."""

    def __init__(
        self,
        in_features: int,
        parts: dict[str, int],
        bias: bool,
        dtype: torch.dtype,
        device,
        ops: LayerOps,
    ) -> None:
        super().__init__(in_features, sum(parts.values()), bias, dtype, device, ops)
        self.parts = dict(parts)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """ "q_proj.weight" (a sibling name of this module) -> its rows of the merged weight."""
        tensors: dict[str, torch.Tensor] = {}
        start = 0
        for part, rows in self.parts.items():
            tensors[f"{part}.weight"] = self.weight.narrow(0, start, rows)
            if self.bias is not None:
                tensors[f"{part}.bias"] = self.bias.narrow(0, start, rows)
            start += rows
        return tensors


class RMSNorm(nn.Module):
    """Normalise in float32, cast back, then scale (as Hugging Face Llama)."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype, device, ops: LayerOps) -> None:
        super().__init__()
        self.weight = _empty(size, dtype=dtype, device=device)
        self.eps = eps
        self.ops = ops

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ops.rms_norm(x, self.weight, self.eps)

    def add_and_norm(
        self, x: torch.Tensor, residual: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x)."""
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class SelfAttention(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_index: int, dtype: torch.dtype, device, ops: LayerOps
    ) -> None:
        super().__init__()
        hidden, head_dim = config.hidden_size, config.head_dim
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = head_dim
        self.scale = head_dim**-0.5
        self.sliding_window = config.sliding_window_for_layer(layer_index)
        self.ops = ops
        q_rows, kv_rows = self.num_heads * head_dim, self.num_kv_heads * head_dim
        self.qkv_proj = MergedLinear(
            hidden,
            {"q_proj": q_rows, "k_proj": kv_rows, "v_proj": kv_rows},
            config.attention_bias,
            dtype,
            device,
            ops,
        )
        self.o_proj = Linear(q_rows, hidden, config.attention_output_bias, dtype, device, ops)
        if config.qk_norm:
            self.q_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype, device, ops)
            self.k_norm = RMSNorm(head_dim, config.rms_norm_eps, dtype, device, ops)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        hidden: torch.Tensor,  # [T, H]
        rope: RopeTables,
        attn: AttentionMetadata,
        attention: LayerAttention,
        layer_cache: torch.Tensor,  # [2, NB, BS, Hkv, D]
    ) -> torch.Tensor:
        num_tokens = hidden.shape[0]
        qkv = self.qkv_proj(hidden)  # [T, (Hq + 2 Hkv) * D]
        q, k, v = self.ops.qkv_rope(
            qkv,
            rope,
            self.num_heads,
            self.num_kv_heads,
            self.head_dim,
            self.q_norm.weight if self.q_norm is not None else None,
            self.k_norm.weight if self.k_norm is not None else None,
            self.q_norm.eps if self.q_norm is not None else 0.0,
        )
        out = attention(q, k, v, layer_cache, self.scale, self.sliding_window)
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))


class GatedMLP(nn.Module):
    """down(silu(gate(x)) * up(x)), gate and up as one matmul."""

    def __init__(self, config: ModelConfig, dtype: torch.dtype, device, ops: LayerOps) -> None:
        super().__init__()
        hidden, inner = config.hidden_size, config.intermediate_size
        bias = config.mlp_bias
        self.ops = ops
        self.gate_up_proj = MergedLinear(
            hidden, {"gate_proj": inner, "up_proj": inner}, bias, dtype, device, ops
        )
        self.down_proj = Linear(inner, hidden, bias, dtype, device, ops)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        down = self.down_proj  # its parameters; the activation and its matmul may be one kernel
        return self.ops.silu_mul_linear(self.gate_up_proj(x), down.weight, down.bias)


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_index: int, dtype: torch.dtype, device, ops: LayerOps
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        self.input_layernorm = RMSNorm(config.hidden_size, eps, dtype, device, ops)
        self.self_attn = SelfAttention(config, layer_index, dtype, device, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, dtype, device, ops)
        self.mlp = GatedMLP(config, dtype, device, ops)

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        """Hugging Face tensor name within the layer ("self_attn.q_proj.weight") -> the
        parameter, or the rows of a merged parameter, that it fills."""
        tensors: dict[str, torch.Tensor] = {}
        for module_name, module in self.named_modules():
            if isinstance(module, MergedLinear):
                parent = module_name.rpartition(".")[0]
                for name, rows in module.checkpoint_tensors().items():
                    tensors[f"{parent}.{name}" if parent else name] = rows
                continue
            for name, param in module.named_parameters(recurse=False):
                tensors[f"{module_name}.{name}" if module_name else name] = param
        return tensors

    def forward(
        self,
        hidden: torch.Tensor,  # [T, H]: the previous layer's MLP output, or the stage input
        residual: torch.Tensor | None,  # [T, H] to add to `hidden`; None: `hidden` is the stream
        rope: RopeTables,
        attn: AttentionMetadata,
        attention: LayerAttention,
        layer_cache: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (MLP output, residual): the layer's output is their sum."""
        if residual is None:
            residual, normed = hidden, self.input_layernorm(hidden)
        else:
            normed, residual = self.input_layernorm.add_and_norm(hidden, residual)
        attended = self.self_attn(normed, rope, attn, attention, layer_cache)
        normed, residual = self.post_attention_layernorm.add_and_norm(attended, residual)
        return self.mlp(normed), residual

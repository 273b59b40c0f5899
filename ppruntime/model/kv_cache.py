"""Paged KV cache storage for the layers of one stage."""

from __future__ import annotations

import torch

from ppruntime.model.config import ModelConfig
from ppruntime.model.partition import StageSpec


def kv_cache_shape(
    config: ModelConfig, stage: StageSpec, num_blocks: int, block_size: int
) -> tuple[int, ...]:
    """[num_layers_in_stage, 2 (k, v), num_blocks, block_size, num_kv_heads, head_dim]."""
    return (
        stage.num_layers,
        2,
        num_blocks,
        block_size,
        config.num_key_value_heads,
        config.head_dim,
    )


def allocate_kv_cache(
    config: ModelConfig,
    stage: StageSpec,
    num_blocks: int,
    block_size: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """A zeroed KV cache tensor for the layers of `stage`."""
    shape = kv_cache_shape(config, stage, num_blocks, block_size)
    return torch.zeros(shape, dtype=dtype, device=device)


def kv_cache_bytes_per_block(
    config: ModelConfig, stage: StageSpec, block_size: int, dtype: torch.dtype = torch.float32
) -> int:
    """Bytes one KV block takes across all layers of `stage` (k and v)."""
    element_size = torch.empty((), dtype=dtype).element_size()
    per_layer = 2 * block_size * config.num_key_value_heads * config.head_dim
    return stage.num_layers * per_layer * element_size

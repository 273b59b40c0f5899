"""A stage with the model's shapes but no math: for overhead benchmarks.

It keeps the whole loop (scheduler, step inputs, transport, sampling, relay) and
replaces each forward with a view of a preallocated zero buffer.
"""

from __future__ import annotations

import torch

from ppruntime.model.attention import AttentionMetadata
from ppruntime.model.config import ModelConfig
from ppruntime.model.partition import StageSpec


class NullStageModel(torch.nn.Module):
    def __init__(
        self, config: ModelConfig, stage: StageSpec, max_num_tokens: int, max_batch_size: int
    ) -> None:
        super().__init__()
        self.config = config
        self.stage = stage
        self.dtype = torch.float32
        self.loaded_tensor_names: tuple[str, ...] = ()
        self._hidden = torch.zeros(max_num_tokens, config.hidden_size)
        self._logits = torch.zeros(max_num_tokens, config.vocab_size)

    def forward(
        self,
        inputs: torch.Tensor,
        positions: torch.Tensor,
        attn: AttentionMetadata,
        kv_cache: torch.Tensor,
    ) -> torch.Tensor:
        return self._hidden[: positions.shape[0]]

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        return self._logits[: hidden.shape[0]]

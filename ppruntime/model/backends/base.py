"""The attention-backend seam: one plan per stage forward, one forward call per layer.

A backend turns a batch's AttentionMetadata into whatever its kernels need (`plan`,
once per stage forward, shared by every layer of the stage), then per layer writes the
new tokens' k/v into the paged cache and attends (`forward`). The `torch` backend is
the reference every other backend is tested against.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from ppruntime.model.attention import AttentionMetadata


class AttentionBackend(Protocol):
    name: str

    def plan(self, attn: AttentionMetadata, positions: torch.Tensor, block_size: int) -> object:
        """Per-batch work shared by all layers of a stage forward (positions [T] int64)."""
        ...

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: torch.Tensor,
        plan: object,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        """q [T, Hq, D], k/v [T, Hkv, D], layer_cache [2, NB, BS, Hkv, D] -> [T, Hq, D].

        Writes k, v into the cache at attn.slot_mapping first (slot -1 writes nothing),
        then every new token attends causally to its sequence's cached context.
        """
        ...


@dataclass
class LayerAttention:
    """A backend bound to one forward's plan: what a decoder layer calls."""

    backend: AttentionBackend
    plan: object

    def __call__(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: torch.Tensor,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        return self.backend.forward(q, k, v, layer_cache, self.plan, scale, sliding_window)

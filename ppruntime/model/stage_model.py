"""StageModel: the part of a decoder-only model that one pipeline stage runs."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ppruntime.model.attention import AttentionMetadata
from ppruntime.model.backends import AttentionBackend, LayerAttention, TorchAttentionBackend
from ppruntime.model.config import ModelConfig
from ppruntime.model.layer_ops import LayerOps, TorchLayerOps
from ppruntime.model.layers import DecoderLayer, RMSNorm
from ppruntime.model.partition import StageSpec
from ppruntime.model.rope import rope_inverse_frequencies

EMBED_NAME = "model.embed_tokens.weight"
NORM_NAME = "model.norm.weight"
LM_HEAD_NAME = "lm_head.weight"


class StageModel(nn.Module):
    """Embedding (first stage), layers [layer_start, layer_end), final norm + LM head (last).

    When embeddings are tied and one stage is both first and last, lm_head shares the
    embedding parameter; otherwise the last stage holds its own copy of the weight.
    `layer_ops` does the math between the matmuls (default: the torch reference).
    """

    def __init__(
        self,
        config: ModelConfig,
        stage: StageSpec,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        attention_backend: AttentionBackend | None = None,
        layer_ops: LayerOps | None = None,
    ) -> None:
        super().__init__()
        self.config = config
        self.attention_backend = attention_backend or TorchAttentionBackend()
        self.stage = stage
        self.dtype = dtype
        self.layer_ops = ops = layer_ops if layer_ops is not None else TorchLayerOps()
        self.loaded_tensor_names: tuple[str, ...] = ()
        hidden, vocab = config.hidden_size, config.vocab_size

        def matrix(rows: int, cols: int) -> nn.Parameter:
            weight = torch.empty(rows, cols, dtype=dtype, device=device)
            return nn.Parameter(weight, requires_grad=False)

        self.embed_tokens = matrix(vocab, hidden) if stage.is_first_stage else None
        self.layers = nn.ModuleList(
            DecoderLayer(config, index, dtype, device, ops)
            for index in range(stage.layer_start, stage.layer_end)
        )
        self.norm = (
            RMSNorm(hidden, config.rms_norm_eps, dtype, device, ops)
            if stage.is_last_stage
            else None
        )
        self.lm_head: nn.Parameter | None = None
        if stage.is_last_stage:
            shares_embedding = config.tie_word_embeddings and self.embed_tokens is not None
            self.lm_head = self.embed_tokens if shares_embedding else matrix(vocab, hidden)
        inv_freq = rope_inverse_frequencies(config).to(device)
        self.register_buffer("rope_inv_freq", inv_freq, persistent=False)

    def checkpoint_parameters(self) -> dict[str, torch.Tensor]:
        """Checkpoint tensor name -> the parameter it fills, for this stage only.

        Merged projections (qkv, gate_up) are listed by their checkpoint names, each mapped
        to its rows of the merged parameter (a view to copy into). A tied lm_head that
        shares the embedding parameter is not listed separately.
        """
        params: dict[str, torch.Tensor] = {}
        if self.embed_tokens is not None:
            params[EMBED_NAME] = self.embed_tokens
        for offset, layer in enumerate(self.layers):
            prefix = f"model.layers.{self.stage.layer_start + offset}."
            for name, tensor in layer.checkpoint_tensors().items():
                params[prefix + name] = tensor
        if self.norm is not None:
            params[NORM_NAME] = self.norm.weight
        if self.lm_head is not None and self.lm_head is not self.embed_tokens:
            params[LM_HEAD_NAME] = self.lm_head
        return params

    def forward(
        self,
        inputs: torch.Tensor,  # first stage: token ids [T]; other stages: hidden [T, H]
        positions: torch.Tensor,  # [T] int64 absolute positions
        attn: AttentionMetadata,
        kv_cache: torch.Tensor,  # [num_layers_in_stage, 2, NB, BS, Hkv, D]
    ) -> torch.Tensor:
        """Hidden states [T, H]; on the last stage, after the final norm."""
        # (no-op casts skipped: each is a torch call, which costs more than tiny math)
        if self.embed_tokens is not None:
            token_ids = inputs if inputs.dtype == torch.int64 else inputs.to(torch.int64)
            hidden = F.embedding(token_ids, self.embed_tokens)
        else:
            hidden = inputs if inputs.dtype == self.dtype else inputs.to(self.dtype)
        if positions.dtype != torch.int64:
            positions = positions.to(torch.int64)
        rope = self.layer_ops.rope_tables(self.rope_inv_freq, positions, self.dtype)
        backend = self.attention_backend
        attention = LayerAttention(backend, backend.plan(attn, positions, kv_cache.shape[3]))
        residual = None
        for offset, layer in enumerate(self.layers):
            hidden, residual = layer(hidden, residual, rope, attn, attention, kv_cache[offset])
        if self.norm is not None:
            if residual is None:
                return self.norm(hidden)
            hidden, _ = self.norm.add_and_norm(hidden, residual)
            return hidden
        # the next stage receives the residual stream itself
        return hidden if residual is None else residual + hidden

    def compute_logits(self, hidden: torch.Tensor, float32: bool = True) -> torch.Tensor:
        """Last stage only: normed hidden [N, H] -> logits [N, V], float32 unless
        `float32` is False (then in the model's dtype: enough for an argmax)."""
        if self.lm_head is None:
            raise RuntimeError(
                f"compute_logits called on stage {self.stage.stage_index} of "
                f"{self.stage.num_stages}; only the last stage holds the LM head"
            )
        if hidden.dtype != self.dtype:
            hidden = hidden.to(self.dtype)
        logits = self.layer_ops.linear(hidden, self.lm_head)
        return logits.to(torch.float32) if float32 and logits.dtype != torch.float32 else logits

"""The metadata of a varlen batch (prefill chunks and decode tokens mixed).

Layout of a batch of B sequences with T new tokens in all: the new tokens of a
sequence are contiguous in the flat batch, sequence b owning flat tokens
[query_start_loc[b], query_start_loc[b+1]). Each token's K/V is written into the cache
at its slot; then every new token attends causally to its own sequence's cached
context (its cached prefix, plus the new tokens up to itself) through the block table.
The attention backends (ppruntime/model/backends) compute it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B+1] int, cumulative new-token counts
    seq_lens: torch.Tensor  # [B] int, context length including the new tokens
    block_table: torch.Tensor  # [B, max_blocks] int (or [R, max_blocks] with block_table_rows)
    slot_mapping: torch.Tensor  # [T] int64, block_id * block_size + offset per new token
    max_query_len: int
    max_seq_len: int
    # [B] int64: sequence b's blocks are row block_table_rows[b] of a persistent table
    # (the engine keeps one row per running sequence, written only when it changes).
    block_table_rows: torch.Tensor | None = None
    # trailing rows of a decode batch padded to a CUDA-graph size: slot -1, seq_len 0;
    # they must change no KV (a backend that skips slot -1 by itself may ignore this)
    num_padded_tokens: int = 0

    @property
    def num_seqs(self) -> int:
        return int(self.seq_lens.shape[0])

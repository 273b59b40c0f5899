"""The `torch` attention backend: gather the context, float32 einsum, masked softmax.

The reference every other backend is tested against. Keys of a sequence are gathered
through its block table into a padded [B, S] grid; a key at position j is visible to a
query at position p when j <= p (and p - j < sliding_window when a window is set).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ppruntime.model.attention import AttentionMetadata


def write_kv(
    k: torch.Tensor, v: torch.Tensor, layer_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    """Store k, v [T, Hkv, D] at flat slots of layer_cache [2, NB, BS, Hkv, D]."""
    num_blocks, block_size = layer_cache.shape[1], layer_cache.shape[2]
    flat = layer_cache.view(2, num_blocks * block_size, *layer_cache.shape[3:])
    flat[0].index_copy_(0, slot_mapping, _as(k, flat.dtype))
    flat[1].index_copy_(0, slot_mapping, _as(v, flat.dtype))


def _as(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`; no torch call when it already is (this backend runs tiny tensors on
    the CPU, where each call's dispatch costs more than the math)."""
    return x if x.dtype == dtype else x.to(dtype)


@dataclass
class BatchLayout:
    """Where each flat token sits in the padded [B, max_q] query grid, where each key sits
    in the cache, and the masks: what every layer of a stage forward shares (the metadata
    and positions alone decide it), built once per forward."""

    query_pos: torch.Tensor  # [B, max_q] int64, padding rows at position 0
    context_len: int  # padded keys per sequence (whole blocks)
    # [B * context_len] int64: the flat cache row (block * block_size + offset) of key j of
    # sequence b. A key past the sequence's length reads the sequence's own key 0 instead:
    # its weight is 0, and it must not be read from whatever the block table points at
    # there (free blocks, other sequences' blocks: 0 * NaN is NaN, so a request whose
    # activations went NaN would spread them to the others).
    key_rows: torch.Tensor
    # (seq_of_token [T], index_in_seq [T]) int64; None when every sequence has exactly one
    # new token (decode): then the query grid is the flat tokens themselves
    tokens: tuple[torch.Tensor, torch.Tensor] | None
    _hidden: dict[int | None, torch.Tensor] = field(default_factory=dict, repr=False)

    def hidden(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, 1, max_q, S] bool: key j is hidden from the query at p when j > p (or
        outside the window), shaped for the [B, Hkv, G, max_q, S] scores."""
        if sliding_window not in self._hidden:
            key_pos = torch.arange(self.context_len, device=self.query_pos.device)[None, None, :]
            query_pos = self.query_pos[:, :, None]
            mask = key_pos > query_pos
            if sliding_window is not None:
                mask |= key_pos <= query_pos - sliding_window
            self._hidden[sliding_window] = mask[:, None, None, :, :]
        return self._hidden[sliding_window]


def batch_layout(
    attn: AttentionMetadata, block_size: int, positions: torch.Tensor | None = None
) -> BatchLayout:
    """The layout of a batch; `positions` [T] default to seq_lens - q_len + index."""
    num_tokens = int(attn.slot_mapping.shape[0])
    num_seqs = attn.num_seqs
    context_len = -(-attn.max_seq_len // block_size) * block_size
    table = _block_table(attn, context_len, block_size)  # [B, nblk] int64
    if attn.max_query_len == 1 and num_tokens == num_seqs:
        tokens = None  # token b is sequence b's one new token
        if positions is None:
            positions = attn.seq_lens - 1
        query_pos = positions.to(torch.int64).reshape(num_seqs, 1)
    else:
        seq_of_token, index_in_seq = _token_coordinates(attn.query_start_loc, num_tokens)
        tokens = (seq_of_token, index_in_seq)
        if positions is None:
            q_lens = attn.query_start_loc[1:] - attn.query_start_loc[:-1]
            positions = (attn.seq_lens - q_lens).to(torch.int64)[seq_of_token] + index_in_seq
        query_pos = positions.new_zeros((num_seqs, attn.max_query_len), dtype=torch.int64)
        query_pos[tokens] = positions.to(torch.int64)
    device = query_pos.device
    offsets = torch.arange(block_size, device=device)
    key_rows = ((table * block_size)[:, :, None] + offsets).view(num_seqs, context_len)
    key_pos = torch.arange(context_len, device=device)
    beyond_length = key_pos[None, :] >= attn.seq_lens.to(device)[:, None]
    key_rows = torch.where(beyond_length, key_rows[:, :1], key_rows)
    return BatchLayout(query_pos, context_len, key_rows.view(-1), tokens)


def _block_table(attn: AttentionMetadata, context_len: int, block_size: int) -> torch.Tensor:
    """The block ids of each sequence's first `context_len` keys: [B, nblk] int64."""
    blocks_needed = context_len // block_size
    if attn.block_table.shape[1] < blocks_needed:
        raise ValueError(
            f"block_table has {attn.block_table.shape[1]} columns but max_seq_len="
            f"{attn.max_seq_len} needs {blocks_needed} blocks of {block_size}"
        )
    table = attn.block_table[:, :blocks_needed]
    if attn.block_table_rows is not None:
        table = table.index_select(0, attn.block_table_rows)
    return table.to(torch.int64)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layer_cache: torch.Tensor,
    attn: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    positions: torch.Tensor | None = None,
    layout: BatchLayout | None = None,
) -> torch.Tensor:
    """q [T, Hq, D], k/v [T, Hkv, D], layer_cache [2, NB, BS, Hkv, D] -> [T, Hq, D].

    `positions` [T] are the absolute positions of the new tokens; when omitted they are
    derived from seq_lens and query_start_loc. `layout` (from `batch_layout`) may be
    passed to reuse the per-batch index work across layers. A key at position j is
    visible to a query at position p when j <= p (and p - j < sliding_window when a
    window is set). Computed in float32, returned in q's dtype.
    """
    slot_mapping = attn.slot_mapping
    if attn.num_padded_tokens:
        k, v, slot_mapping = _redirect_padded_rows(k, v, slot_mapping)
    write_kv(k, v, layer_cache, slot_mapping)
    if layout is None:
        layout = batch_layout(attn, layer_cache.shape[2], positions)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads = layer_cache.shape[3]
    group = num_q_heads // num_kv_heads
    num_seqs, max_q = layout.query_pos.shape
    grid = (num_seqs, max_q, num_kv_heads, group, head_dim)

    keys, values = _gather_context(layer_cache, layout)  # [B, S, Hkv, D]
    tokens = layout.tokens
    if tokens is None:  # one token per sequence: the grid is q, as one contiguous tensor
        padded_q = _as(q, torch.float32).contiguous().view(grid)
    else:
        padded_q = q.new_zeros((num_seqs, max_q, num_q_heads, head_dim), dtype=torch.float32)
        padded_q[tokens] = _as(q, torch.float32)
        padded_q = padded_q.view(grid)

    scores = torch.einsum("bqhgd,bshd->bhgqs", padded_q, keys) * scale  # [B, Hkv, G, max_q, S]
    probs = torch.softmax(scores.masked_fill(layout.hidden(sliding_window), float("-inf")), dim=-1)
    out = torch.einsum("bhgqs,bshd->bqhgd", probs, values)  # [B, max_q, Hkv, G, D]
    if tokens is None:
        return _as(out.reshape(num_tokens, num_q_heads, head_dim), q.dtype)
    out = out.reshape(num_seqs, max_q, num_q_heads, head_dim)
    return _as(out[tokens], q.dtype)


def _redirect_padded_rows(
    k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded rows (slot -1) rewrite row 0's K/V at row 0's slot: the same bits to the same
    place, so they change nothing, in any order, with no host sync (a CUDA graph can hold
    it). Row 0 is real in every replay; a capture's all-padded warm-up writes slot 0 at
    start-up, before any sequence owns it (a sequence reads only what it wrote)."""
    padded = slot_mapping < 0
    slots = torch.where(padded, slot_mapping[:1].clamp(min=0), slot_mapping)
    rows = padded[:, None, None]
    return torch.where(rows, k[:1], k), torch.where(rows, v[:1], v), slots


def _token_coordinates(
    query_start_loc: torch.Tensor, num_tokens: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each flat token: (its sequence index, its index among the sequence's new tokens)."""
    starts = query_start_loc.to(torch.int64)
    token = torch.arange(num_tokens, device=starts.device)
    seq_of_token = torch.searchsorted(starts[1:], token, right=True)  # [T]
    return seq_of_token, token - starts[seq_of_token]


def _gather_context(
    layer_cache: torch.Tensor, layout: BatchLayout
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's cached K and V laid out by position: [B, context_len, Hkv, D] float32."""
    _, num_blocks, block_size, num_kv_heads, head_dim = layer_cache.shape
    rows = layer_cache.view(2, num_blocks * block_size, num_kv_heads * head_dim)
    num_seqs = layout.query_pos.shape[0]
    kv = rows.index_select(1, layout.key_rows)  # one row of Hkv * D values a key
    kv = _as(kv.view(2, num_seqs, layout.context_len, num_kv_heads, head_dim), torch.float32)
    return kv[0], kv[1]


@dataclass
class TorchAttentionPlan:
    attn: AttentionMetadata
    layout: BatchLayout


class TorchAttentionBackend:
    """Today's code behind the seam: write_kv + paged_attention over a shared layout.

    Not capturable in a CUDA graph as it is: its gather is sized by attn.max_seq_len, a
    host value of each step (PPRUNTIME_FORCE_CUDA_GRAPHS captures it planned for the
    longest context: correct, slow)."""

    name = "torch"
    supports_cuda_graphs = False

    def plan(
        self, attn: AttentionMetadata, positions: torch.Tensor, block_size: int
    ) -> TorchAttentionPlan:
        return TorchAttentionPlan(attn, batch_layout(attn, block_size, positions))

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: torch.Tensor,
        plan: TorchAttentionPlan,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        return paged_attention(
            q, k, v, layer_cache, plan.attn, scale, sliding_window, layout=plan.layout
        )

"""The `triton` attention backend: a KV-store kernel and flash-style paged attention.

Prefill and mixed steps run `store_kv` first, then attention. So do decode steps by
default; with `fused_decode_store` (PPRUNTIME_FUSED_KV_STORE=1) a decode step launches the
attention kernel alone, its launch (`decode_launch`, fused_store) writing the new token's
k / v into the cache itself: one launch fewer a layer. It is off until it has been timed
on a GPU against the two launches (scripts/sweep_decode_attention.py, "default" against
"separate-store"): under the compiler it peels the last key tile off the pipelined loop
and takes more registers (the 1B shape's decode kernel fits 2 programs an SM, not 3).

plan() reads host values only, never tensor data:
- attn.max_query_len == 1 together with num_tokens == num_seqs picks the decode path
  (one program per sequence x KV head x split, then a merge kernel);
- the split count comes from num_seqs, the KV head count and the GPU's SM count, capped
  by what the block table's reach (its width x block_size, i.e. max_model_len; not this
  step's longest context) fills with 256 keys a split; each sequence's keys are cut
  into that many runs on the device.
So consecutive decode steps of one batch size launch identical grids (and
attn.max_seq_len is only checked against the table, never launched on). To capture a
CUDA graph, build the plan with `decode=True` (padded rows included: seq_len 0, slot
-1); `TritonAttentionPlan.launch` is then fixed for the graph's batch size. Neither
the split count nor `max_context_len` bounds the context a launch handles.
float32 inputs run the same kernels with IEEE-precision dots (no fallback).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from ppruntime.kernels.kv_store import store_kv
from ppruntime.kernels.paged_attention import (
    AttentionLaunch,
    decode_launch,
    paged_attention,
    prefill_launch,
)
from ppruntime.model.attention import AttentionMetadata

# a decode batch of at least 2 programs an SM runs unsplit: on the H200 one split beat two
# at batch 64 x 8 KV heads for every context up to 4k (scripts/sweep_decode_attention.py)
PROGRAMS_PER_SM = 2
INTERPRETED_TARGET_PROGRAMS = 8


@dataclass
class TritonAttentionPlan:
    attn: AttentionMetadata
    decode: bool
    max_context_len: int  # caps the decode split count (a context this long fills it)
    target_programs: int
    fused_store: bool = False  # a decode launch stores this step's k / v itself
    launch: AttentionLaunch | None = None  # fixed on first use (all layers share it)

    def launch_for(
        self, num_kv_heads: int, group: int, head_dim: int, dtype: torch.dtype
    ) -> AttentionLaunch:
        if self.launch is None:
            if self.decode:
                self.launch = decode_launch(
                    self.attn.num_seqs,
                    num_kv_heads,
                    self.max_context_len,
                    self.target_programs,
                    head_dim=head_dim,
                    fused_store=self.fused_store,
                )
            else:
                self.launch = prefill_launch(dtype, self.attn.max_query_len, group)
        return self.launch


@functools.cache
def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return PROGRAMS_PER_SM * torch.cuda.get_device_properties(device).multi_processor_count
    return INTERPRETED_TARGET_PROGRAMS


class TritonAttentionBackend:
    name = "triton"
    # decode plans read host values only and launch grids fixed per batch size; padded
    # rows (slot -1, seq_len 0) write nothing: ppruntime/stage/graphs.py captures it
    supports_cuda_graphs = True

    def __init__(self, fused_decode_store: bool = False) -> None:
        self.fused_decode_store = fused_decode_store

    def plan(
        self,
        attn: AttentionMetadata,
        positions: torch.Tensor,
        block_size: int,
        *,
        decode: bool | None = None,
        max_context_len: int | None = None,
    ) -> TritonAttentionPlan:
        """`decode` forces the decode path on or off (for graph capture); `max_context_len`
        (default: the block table's reach) caps how many splits a decode launch uses.

        Positions are implied by the metadata (seq_len - q_len + index), as the engine
        builds them; `positions` is accepted for the interface.
        """
        reach = attn.block_table.shape[1] * block_size
        if attn.max_seq_len > reach:
            raise ValueError(
                f"block_table has {attn.block_table.shape[1]} columns but max_seq_len="
                f"{attn.max_seq_len} needs {-(-attn.max_seq_len // block_size)} blocks of "
                f"{block_size}"
            )
        num_tokens = attn.slot_mapping.shape[0]
        if decode is None:
            decode = attn.max_query_len == 1 and num_tokens == attn.num_seqs
        elif decode and num_tokens != attn.num_seqs:
            raise ValueError(
                f"a decode plan needs one token per sequence, got {num_tokens} tokens for "
                f"{attn.num_seqs} sequences"
            )
        return TritonAttentionPlan(
            attn,
            decode,
            min(max_context_len or reach, reach),
            _target_programs(attn.seq_lens.device),
            fused_store=self.fused_decode_store,
        )

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        layer_cache: torch.Tensor,
        plan: TritonAttentionPlan,
        scale: float,
        sliding_window: int | None,
    ) -> torch.Tensor:
        attn = plan.attn
        launch = plan.launch_for(
            layer_cache.shape[3], q.shape[1] // layer_cache.shape[3], q.shape[2], q.dtype
        )
        # decode: the attention launch stores k / v itself (one kernel a layer fewer)
        if not launch.fused_store:
            store_kv(k, v, layer_cache, attn.slot_mapping)
        return paged_attention(
            q,
            layer_cache,
            attn.query_start_loc,
            attn.seq_lens,
            attn.block_table,
            scale,
            launch,
            block_table_rows=attn.block_table_rows,
            sliding_window=sliding_window,
            k_new=k,  # read from here when the launch's new_kv says so, or stored (decode)
            v_new=v,
            slot_mapping=attn.slot_mapping if launch.fused_store else None,
        )

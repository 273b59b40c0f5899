"""Wire formats of the hot-path messages: flat int32 buffers, no pickling.

MICROBATCH message: [header (HEADER_LEN int32) | packed schedule]. The header
carries the iteration, the ready count (rank 0's broadcast of how many batches
every rank handles in this iteration), flags and sizes; the schedule is the
`ScheduledBatch` as consecutive int32 arrays.

SAMPLE_STATE message: [batch_id, B, flags | slots | sampled | tokens | finish codes].
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ppruntime.comm.activation_dtypes import DTYPE_CODES, DTYPES_BY_CODE  # noqa: F401
from ppruntime.engine.scheduler import ScheduledBatch

HEADER_LEN = 16
# header fields
H_ITERATION, H_READY, H_FLAGS, H_BATCH_ID, H_NUM_SEQS, H_NUM_BLOCKS = range(6)
H_NUM_ADMIT, H_NUM_PREEMPT, H_NUM_TOKENS, H_HIDDEN, H_DTYPE = range(6, 11)
# flags
F_SHUTDOWN = 1
F_CONTROL = 2  # a MICROBATCH_CONTROL message follows
F_BATCH = 4
F_ACTIVATIONS = 8  # an ACTIVATIONS message follows


@dataclass
class MicrobatchHeader:
    iteration: int
    ready_count: int
    shutdown: bool
    has_control: bool
    batch: ScheduledBatch | None
    num_tokens: int = 0
    hidden_size: int = 0
    dtype_code: int = 0

    @property
    def has_activations(self) -> bool:
        return self.batch is not None and self.num_tokens > 0 and self.hidden_size > 0


def microbatch_capacity(
    max_batch_size: int, max_num_tokens: int, block_size: int, max_slots: int
) -> int:
    """Largest MICROBATCH message, in int32 words."""
    max_blocks = max_num_tokens // block_size + 2 * max_batch_size
    return HEADER_LEN + 8 * max_batch_size + max_blocks + max_slots


def pack_microbatch(header: MicrobatchHeader, out: np.ndarray) -> np.ndarray:
    """Write the message into `out` (a preallocated int32 buffer); return the used view."""
    flags = (F_SHUTDOWN if header.shutdown else 0) | (F_CONTROL if header.has_control else 0)
    out[:HEADER_LEN] = 0
    out[H_ITERATION] = header.iteration
    out[H_READY] = header.ready_count
    batch = header.batch
    if batch is None:
        out[H_FLAGS] = flags
        return out[:HEADER_LEN]
    flags |= F_BATCH
    if header.has_activations:
        flags |= F_ACTIVATIONS
    out[H_FLAGS] = flags
    num_seqs = batch.num_seqs
    out[H_BATCH_ID] = batch.batch_id
    out[H_NUM_SEQS] = num_seqs
    out[H_NUM_BLOCKS] = batch.block_ids.shape[0]
    out[H_NUM_ADMIT] = batch.admit_slots.shape[0]
    out[H_NUM_PREEMPT] = batch.preempt_slots.shape[0]
    out[H_NUM_TOKENS] = header.num_tokens
    out[H_HIDDEN] = header.hidden_size
    out[H_DTYPE] = header.dtype_code
    position = HEADER_LEN
    for array in (
        batch.slots,
        batch.num_new,
        batch.starts,
        batch.sample_mask,
        batch.block_counts,
        batch.block_ids,
        batch.admit_slots,
        batch.admit_seq_ids,
        batch.preempt_slots,
    ):
        size = array.shape[0]
        out[position : position + size] = array
        position += size
    return out[:position]


def unpack_microbatch(message: np.ndarray) -> MicrobatchHeader:
    """Parse a received MICROBATCH message (arrays are copies, safe to keep)."""
    flags = int(message[H_FLAGS])
    header = MicrobatchHeader(
        iteration=int(message[H_ITERATION]),
        ready_count=int(message[H_READY]),
        shutdown=bool(flags & F_SHUTDOWN),
        has_control=bool(flags & F_CONTROL),
        batch=None,
    )
    if not flags & F_BATCH:
        return header
    num_seqs = int(message[H_NUM_SEQS])
    sizes = (
        num_seqs,
        num_seqs,
        num_seqs,
        num_seqs,
        num_seqs,
        int(message[H_NUM_BLOCKS]),
        int(message[H_NUM_ADMIT]),
        int(message[H_NUM_ADMIT]),
        int(message[H_NUM_PREEMPT]),
    )
    arrays = []
    position = HEADER_LEN
    for size in sizes:
        arrays.append(message[position : position + size].copy())
        position += size
    slots, num_new, starts, sample_mask, counts, block_ids, admit_slots, admit_ids, preempt = arrays
    header.batch = ScheduledBatch(
        batch_id=int(message[H_BATCH_ID]),
        slots=slots.astype(np.intp),
        num_new=num_new,
        starts=starts,
        sample_mask=sample_mask.astype(np.bool_),
        block_counts=counts,
        block_ids=block_ids,
        admit_seq_ids=admit_ids.astype(np.int64),
        admit_slots=admit_slots.astype(np.intp),
        preempt_slots=preempt.astype(np.intp),
    )
    if flags & F_ACTIVATIONS:
        header.num_tokens = int(message[H_NUM_TOKENS])
        header.hidden_size = int(message[H_HIDDEN])
        header.dtype_code = int(message[H_DTYPE])
    return header


# -- sample state ---------------------------------------------------------------------
FINISH_NONE, FINISH_STOP, FINISH_LENGTH, FINISH_ABORT = 0, 1, 2, 3
FINISH_NONFINITE = 4  # the request's logits held a NaN or an inf: its token is meaningless
FINISH_REASONS = {
    FINISH_STOP: "stop",
    FINISH_LENGTH: "length",
    FINISH_ABORT: "abort",
    FINISH_NONFINITE: "error",
}
S_HAS_DIFF = 1  # a RESPONSE_DIFF message follows


@dataclass
class SampleState:
    """What the last stage decided for one batch; every rank applies it."""

    batch_id: int
    slots: np.ndarray  # [B] intp, the batch's slots in batch order
    sampled: np.ndarray  # [B] bool
    token_ids: np.ndarray  # [B] int32 (-1 where not sampled)
    finish: np.ndarray  # [B] int32 FINISH_* codes
    has_diff: bool = False


def pack_sample_state(state: SampleState) -> np.ndarray:
    num_seqs = state.slots.shape[0]
    out = np.empty(3 + 4 * num_seqs, dtype=np.int32)
    out[0] = state.batch_id
    out[1] = num_seqs
    out[2] = S_HAS_DIFF if state.has_diff else 0
    out[3 : 3 + num_seqs] = state.slots
    out[3 + num_seqs : 3 + 2 * num_seqs] = state.sampled
    out[3 + 2 * num_seqs : 3 + 3 * num_seqs] = state.token_ids
    out[3 + 3 * num_seqs :] = state.finish
    return out


def unpack_sample_state(message: np.ndarray) -> SampleState:
    num_seqs = int(message[1])
    body = message[3:]
    return SampleState(
        batch_id=int(message[0]),
        slots=body[:num_seqs].astype(np.intp),
        sampled=body[num_seqs : 2 * num_seqs].astype(np.bool_),
        token_ids=body[2 * num_seqs : 3 * num_seqs],
        finish=body[3 * num_seqs : 4 * num_seqs],
        has_diff=bool(int(message[2]) & S_HAS_DIFF),
    )

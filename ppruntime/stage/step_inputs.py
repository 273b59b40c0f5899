"""Pooled, preallocated step inputs, written only where they change (DESIGN §2.3).

Every buffer is allocated once, sized for the largest microbatch. The block table
is the sequence table's own array (one row per slot, written only when a sequence
joins or crosses a page boundary); per step, token ids, positions, sequence
lengths and the slot mapping are derived from it with array operations into the
prefixes of their buffers. `StepCounters` make allocations and bytes written
visible to tests and benchmarks.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ppruntime.model.attention import AttentionMetadata

# step sizes whose host-to-device copy views are kept (decode steps repeat a few
# sizes; prefill sizes vary, so the cache is bounded)
_MAX_CACHED_SHAPES = 256


@dataclass
class StepCounters:
    allocations: int = 0  # pooled buffers created: all at construction, none per step
    steps: int = 0
    decode_steps: int = 0
    decode_step_allocations: int = 0  # pooled-buffer allocations during decode steps
    bytes_written: dict[str, int] = field(default_factory=dict)

    def add_bytes(self, kind: str, count: int) -> None:
        self.bytes_written[kind] = self.bytes_written.get(kind, 0) + count

    def add_step(self, num_seqs: int, num_tokens: int, with_token_ids: bool) -> None:
        """Bytes of the int64 step inputs written for one microbatch."""
        self.steps += 1
        written = self.bytes_written
        for kind, count in (
            ("rows", num_seqs),
            ("seq_lens", num_seqs),
            ("query_start_loc", num_seqs + 1),
            ("positions", num_tokens),
            ("slot_mapping", num_tokens),
            ("token_ids", num_tokens if with_token_ids else 0),
        ):
            written[kind] = written.get(kind, 0) + count * 8


@dataclass
class CarriedTokens:
    """Input tokens of a step that are not on the host yet: the sampled ids of the step
    in flight, still on the device (async scheduling at PP=1). They are gathered into
    the step's token-id buffer on the device, after the host's token ids went up."""

    sampled: torch.Tensor  # [S] int32: the step in flight's sampled ids, on the device
    sampled_rows: np.ndarray | None  # [C] int64: which of them...
    token_index: np.ndarray | None  # [C] int64: ...is the input of which flat token of this step
    # the first `leading` flat tokens take the first `leading` sampled ids, in order
    # (steady decode: the same rows as the step in flight); then both arrays are None
    leading: int = 0


@dataclass
class StepInputs:
    """Views into the pooled buffers for one microbatch (no copies)."""

    token_ids: torch.Tensor | None  # [T] int64, first stage only
    positions: torch.Tensor  # [T] int64
    attn: AttentionMetadata
    sample_token_index: torch.Tensor  # [S] int64: last flat token of each sampling sequence
    num_tokens: int  # real tokens of the microbatch (padded rows not counted)
    is_decode: bool
    num_rows: int = 0  # rows the forward runs: num_tokens, or the decode bucket when padded


_ALIGN = 16  # elements: every buffer starts 128-byte aligned (kernels specialise on it)


def _flat_offsets(sizes: dict[str, int]) -> tuple[dict[str, int], int]:
    """Where each buffer starts in the flat buffer (in the order of `sizes`), and its
    total length."""
    offsets, offset = {}, 0
    for name, size in sizes.items():
        offsets[name] = offset
        offset += -(-size // _ALIGN) * _ALIGN
    return offsets, offset


def _flat_views(flat: torch.Tensor, sizes: dict[str, int]) -> dict[str, torch.Tensor]:
    """Views of `flat`, one per buffer, laid out by `_flat_offsets`."""
    offsets, _ = _flat_offsets(sizes)
    return {name: flat[offsets[name] : offsets[name] + size] for name, size in sizes.items()}


class _StagingSet:
    """One set of the host buffers a step's inputs are written into: numpy views of
    one flat int64 tensor (pinned on an accelerator), and the event of its last copy."""

    def __init__(self, sizes: dict[str, int], pinned: bool) -> None:
        _, total = _flat_offsets(sizes)
        self.flat = torch.zeros(total, dtype=torch.int64, pin_memory=pinned)
        self.tensors = _flat_views(self.flat, sizes)
        self.arrays = {name: tensor.numpy() for name, tensor in self.tensors.items()}
        self.arange_len = 1  # query_start_loc[:arange_len] holds 0, 1, 2, ... already
        self._event = None

    def copied(self) -> None:
        """The step's copies from this set are queued: mark their end."""
        self._event = torch.cuda.Event()
        self._event.record()

    def wait_for_copy(self) -> None:
        if self._event is not None:
            self._event.synchronize()  # long done in a steady loop: the set alternates
            self._event = None


class StepInputPool:
    """The persistent step-input buffers of one stage.

    block_table: the sequence table's [slots, max_blocks] int32 array (shared).
    token_table: [slots, max_model_len] int32 prompt + output tokens per slot,
        first stage only (None elsewhere).
    """

    def __init__(
        self,
        block_table: np.ndarray,
        rows_changed: np.ndarray,
        block_size: int,
        max_num_tokens: int,
        max_batch_size: int,
        token_table: np.ndarray | None,
        device: torch.device,
    ) -> None:
        self.block_size = block_size
        self.block_table = block_table
        self.rows_changed = rows_changed  # [slots] bool, set by the table when a row is written
        self.max_blocks_per_seq = block_table.shape[1]
        self.token_table = token_table
        self.device = device
        self.counters = StepCounters()
        self._cached_views: tuple[tuple[int, int, int], StepInputs] | None = None
        self._copy_pair_cache: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # one flat buffer per side, the buffers one after the other: a step's inputs go
        # to the device in one copy, of everything up to the end of slot_mapping's used
        # prefix (so the per-batch buffers come first, slot_mapping last)
        sizes = {
            "seq_lens": max_batch_size,
            "query_start_loc": max_batch_size + 1,
            "rows": max_batch_size,
            "sample_index": max_batch_size,
            "token_ids": max_num_tokens,
            "positions": max_num_tokens,
            "slot_mapping": max_num_tokens,
        }
        self._slot_mapping_offset = _flat_offsets(sizes)[0]["slot_mapping"]
        # the host side of the buffers the device reads: one set on the CPU (it is the
        # device's); on an accelerator two pinned sets, used in turn, so a step's copy
        # to the device is truly asynchronous while the host writes the next step's
        self._staging = [
            _StagingSet(sizes, pinned=device.type != "cpu")
            for _ in range(1 if device.type == "cpu" else 2)
        ]
        self.counters.allocations += len(sizes) * len(self._staging)
        self._use_staging(0)
        self._flat_index = self._buffer(max_num_tokens)
        self._remainder = self._buffer(max_num_tokens)
        self._token_rows = self._buffer(max_num_tokens)
        self._gathered = np.zeros(max_num_tokens, dtype=np.int32)  # int32 table lookups
        self.counters.allocations += 1
        self._block_table_flat = block_table.reshape(-1)  # views of the shared tables
        self._token_table_flat = None if token_table is None else token_table.reshape(-1)
        self._host_block_table = torch.from_numpy(block_table)
        if device.type == "cpu":
            self._device = {**self._host, "block_table": self._host_block_table}
        else:  # one device copy of the flat buffer; per step one copy of its used prefix
            self._device_flat = self._staging[0].flat.to(device)
            self._device = _flat_views(self._device_flat, sizes)
            self._device["block_table"] = self._host_block_table.to(device)
            self.counters.allocations += len(self._device)

    def _use_staging(self, index: int) -> None:
        """Make staging set `index` the one this step writes (waiting, rarely, for the
        copy that last read it)."""
        staging = self._staging[index]
        staging.wait_for_copy()
        self._staging_index = index
        self._host = staging.tensors
        for name, array in staging.arrays.items():
            setattr(self, name, array)

    @property
    def _arange_len(self) -> int:
        """query_start_loc[:_arange_len] holds 0, 1, 2, ... already (in this set)."""
        return self._staging[self._staging_index].arange_len

    @_arange_len.setter
    def _arange_len(self, value: int) -> None:
        self._staging[self._staging_index].arange_len = value

    def _buffer(self, size: int) -> np.ndarray:
        """Host-only scratch (never read by the device)."""
        self.counters.allocations += 1
        return np.zeros(size, dtype=np.int64)

    def prepare(
        self, batch, pad_to: int | None = None, carried: CarriedTokens | None = None
    ) -> StepInputs:
        """Fill the pooled buffers for one microbatch.

        carried: token ids to take on the device from a step in flight (first stage).
        pad_to: decode only: append rows up to this many (a CUDA graph's batch size).
        A padded row writes no KV (slot -1), attends to nothing (seq_len 0), sits at
        position 0 with token 0 and reads an existing block-table row; it samples
        nothing, so sample_token_index and num_tokens describe the real rows only.
        """
        counters = self.counters
        allocations_before = counters.allocations
        if len(self._staging) > 1:
            self._use_staging((self._staging_index + 1) % len(self._staging))
        num_seqs = batch.slots.shape[0]
        q_lens = batch.num_new
        starts = batch.starts
        num_tokens = batch.num_tokens
        is_decode = num_tokens == num_seqs
        num_rows = num_tokens if pad_to is None else pad_to
        if num_rows != num_tokens and (not is_decode or num_rows < num_seqs):
            raise ValueError(
                f"pad_to={pad_to} applies to decode batches of at most that many sequences; "
                f"got {num_seqs} sequences with {num_tokens} tokens"
            )

        rows = self.rows[:num_seqs]
        rows[:] = batch.slots
        seq_lens = self.seq_lens[:num_seqs]
        query_start_loc = self.query_start_loc[: num_seqs + 1]
        positions = self.positions[:num_tokens]
        if is_decode:
            # one token per sequence: token b is sequence b, at position start_b
            np.add(starts, 1, out=seq_lens)
            self._fill_arange(self.query_start_loc[: num_rows + 1])
            positions[:] = starts
            token_rows = rows
        else:
            np.add(starts, q_lens, out=seq_lens)
            np.cumsum(q_lens, out=query_start_loc[1:])
            self._arange_len = 1  # the cumsum overwrote all but query_start_loc[0] = 0
            # position of token t of sequence b = start_b + (t - query_start_loc[b])
            positions[:] = np.repeat(starts - query_start_loc[:-1], q_lens)
            positions += np.arange(num_tokens)
            token_rows = self._token_rows[:num_tokens]
            token_rows[:] = np.repeat(rows, q_lens)

        # slot = block_table[row, pos // block_size] * block_size + pos % block_size
        flat_index = self._flat_index[:num_tokens]
        remainder = self._remainder[:num_tokens]
        slot_mapping = self.slot_mapping[:num_tokens]
        gathered = self._gathered[:num_tokens]
        np.divmod(positions, self.block_size, out=(flat_index, remainder))
        np.multiply(token_rows, self.max_blocks_per_seq, out=slot_mapping)  # scratch
        flat_index += slot_mapping
        np.take(self._block_table_flat, flat_index, out=gathered)
        np.multiply(gathered, self.block_size, out=slot_mapping)
        slot_mapping += remainder

        if self.token_table is not None:
            # token of (row, position) = token_table.flat[row * max_model_len + position]
            np.multiply(token_rows, self.token_table.shape[1], out=flat_index)
            flat_index += positions
            np.take(self._token_table_flat, flat_index, out=gathered)
            self.token_ids[:num_tokens] = gathered

        sample_mask = batch.sample_mask
        if is_decode and sample_mask.all():
            num_samples = num_seqs
            sample_index = self.sample_index[:num_samples]
            np.subtract(query_start_loc[1:], 1, out=sample_index)
        else:
            num_samples = int(np.count_nonzero(sample_mask))
            sample_index = self.sample_index[:num_samples]
            np.compress(sample_mask, query_start_loc[1:], out=sample_index)
            sample_index -= 1

        if num_rows > num_tokens:
            self._pad_decode_rows(num_seqs, num_rows)
        view_seqs = num_seqs + (num_rows - num_tokens)  # padded rows are sequences too
        counters.add_step(view_seqs, num_rows, self.token_table is not None)
        if is_decode:
            counters.decode_steps += 1
            counters.decode_step_allocations += counters.allocations - allocations_before
        max_query_len = 1 if is_decode else int(q_lens.max())
        inputs = self._views(view_seqs, num_rows, num_samples, max_query_len, is_decode)
        inputs.num_tokens = num_tokens
        inputs.attn.num_padded_tokens = num_rows - num_tokens
        if carried is not None:
            self._write_carried(inputs.token_ids, carried)
        return inputs

    def _write_carried(self, token_ids: torch.Tensor, carried: CarriedTokens) -> None:
        """token_ids[token_index] = sampled[sampled_rows], on the device, in stream order
        after the host's copy (the buffer keeps its address: graphs read it)."""
        if carried.sampled_rows is None:  # one copy (int32 -> int64), no index to upload
            token_ids[: carried.leading].copy_(carried.sampled[: carried.leading])
            return
        index = np.stack([carried.sampled_rows, carried.token_index]).astype(np.int64)
        index = torch.from_numpy(index)  # [2, C]
        if self.device.type != "cpu":
            staged = torch.empty(index.shape, dtype=index.dtype, pin_memory=True)
            staged.copy_(index)
            index = staged.to(self.device, non_blocking=True)
        values = carried.sampled.index_select(0, index[0]).to(token_ids.dtype)
        token_ids.index_copy_(0, index[1], values)

    def _pad_decode_rows(self, num_real: int, num_rows: int) -> None:
        """Rows [num_real, num_rows) of a decode batch: harmless, write and read nothing."""
        padded = slice(num_real, num_rows)
        self.rows[padded] = self.rows[0] if num_real else 0  # a row that exists
        self.seq_lens[padded] = 0
        self.positions[padded] = 0
        self.slot_mapping[padded] = -1
        self.token_ids[padded] = 0
        # query_start_loc[:num_rows + 1] already holds 0..num_rows (one token per row)

    def _fill_arange(self, query_start_loc: np.ndarray) -> None:
        """query_start_loc = 0, 1, ..., n: written only past what still holds it."""
        size = query_start_loc.shape[0]
        if size > self._arange_len:
            query_start_loc[self._arange_len :] = np.arange(self._arange_len, size)
            self._arange_len = size

    def _copy_pair(self, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(device, host) prefixes of the flat buffers that hold every input of a step
        of `num_tokens` rows (the per-batch buffers whole, the token buffers up to the
        end of slot_mapping's rows), in this staging set: sliced once per size (slicing
        is a torch call)."""
        key = (self._staging_index, num_tokens)
        pair = self._copy_pair_cache.get(key)
        if pair is None:
            end = self._slot_mapping_offset + num_tokens
            pair = (self._device_flat[:end], self._staging[self._staging_index].flat[:end])
            if len(self._copy_pair_cache) >= _MAX_CACHED_SHAPES:
                self._copy_pair_cache.clear()
            self._copy_pair_cache[key] = pair
        return pair

    def _views(
        self, num_seqs: int, num_tokens: int, num_samples: int, max_query_len: int, is_decode: bool
    ) -> StepInputs:
        host, dev = self._host, self._device
        if dev["positions"] is not host["positions"]:
            target, source = self._copy_pair(num_tokens)
            target.copy_(source, non_blocking=True)
            self._staging[self._staging_index].copied()
            changed = np.flatnonzero(self.rows_changed)
            if changed.shape[0]:  # only rows written since the last step travel
                rows = torch.from_numpy(changed)
                # from pinned memory (the caching host allocator keeps each buffer until
                # its copy is done): a copy from pageable memory may wait for the GPU
                target = rows.pin_memory().to(self.device, non_blocking=True)
                values = self._host_block_table[rows].pin_memory()
                dev["block_table"][target] = values.to(self.device, non_blocking=True)
                self.rows_changed[changed] = False
                self.counters.add_bytes(
                    "block_table_device", int(changed.shape[0]) * self.max_blocks_per_seq * 4
                )
        max_seq_len = int(self.seq_lens[:num_seqs].max())
        shape = (num_seqs, num_tokens, num_samples)
        cached = self._cached_views
        if cached is not None and cached[0] == shape:
            # same batch shape as last step (steady decode): the views are still valid
            inputs = cached[1]
            inputs.attn.max_query_len = max_query_len
            inputs.attn.max_seq_len = max_seq_len
            inputs.is_decode = is_decode
            inputs.num_tokens = num_tokens
            inputs.num_rows = num_tokens
            return inputs
        attn = AttentionMetadata(
            query_start_loc=dev["query_start_loc"][: num_seqs + 1],
            seq_lens=dev["seq_lens"][:num_seqs],
            block_table=dev["block_table"],
            slot_mapping=dev["slot_mapping"][:num_tokens],
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
            block_table_rows=dev["rows"][:num_seqs],
        )
        inputs = StepInputs(
            token_ids=dev["token_ids"][:num_tokens] if self.token_table is not None else None,
            positions=dev["positions"][:num_tokens],
            attn=attn,
            sample_token_index=dev["sample_index"][:num_samples],
            num_tokens=num_tokens,
            is_decode=is_decode,
            num_rows=num_tokens,
        )
        self._cached_views = (shape, inputs)
        return inputs

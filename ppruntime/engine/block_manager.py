"""KV cache block accounting (pure Python + numpy; no torch, no MPI).

Rank 0 allocates; every other rank replays the same allocations with `take()`,
which also checks that its free list agrees with rank 0's choice, so a divergence
between ranks is caught at the first block instead of as corrupted attention.
"""

from __future__ import annotations

import numpy as np

_NO_BLOCKS = np.zeros(0, dtype=np.intp)
_NO_BLOCKS.flags.writeable = False  # shared by every empty allocation


class BlockAccountingError(RuntimeError):
    """The block state of this rank no longer matches rank 0's decisions."""


class BlockManager:
    """A stack of free block ids: the last freed block is reused first."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._stack = np.arange(num_blocks - 1, -1, -1, dtype=np.intp)  # intp: used as an index
        self._num_free = num_blocks
        self._is_free = np.ones(num_blocks, dtype=np.bool_)

    @property
    def num_free_blocks(self) -> int:
        return self._num_free

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def can_allocate(self, count: int) -> bool:
        return count <= self._num_free

    def allocate(self, count: int) -> np.ndarray:
        """Pop `count` free blocks; returns a new intp array."""
        if count < 0:
            raise ValueError(f"cannot allocate a negative number of KV blocks ({count})")
        if count > self._num_free:
            raise BlockAccountingError(
                f"asked for {count} KV blocks but only {self._num_free} are free"
            )
        if count == 0:
            return _NO_BLOCKS
        start = self._num_free - count
        taken = self._stack[start : self._num_free][::-1].copy()
        self._num_free = start
        self._is_free[taken] = False
        return taken

    def take(self, block_ids: np.ndarray) -> None:
        """Replay an allocation decided by rank 0; fail if this rank would differ."""
        expected = self.allocate(int(block_ids.shape[0]))
        if not np.array_equal(expected, block_ids):
            raise BlockAccountingError(
                f"KV block divergence: rank 0 allocated {block_ids.tolist()} but this "
                f"rank's free list gives {expected.tolist()}"
            )

    def free(self, block_ids: np.ndarray) -> None:
        count = int(block_ids.shape[0])
        if count == 0:
            return
        if int(block_ids.min()) < 0 or int(block_ids.max()) >= self.num_blocks:
            raise BlockAccountingError(f"KV block ids out of range: {block_ids.tolist()}")
        if self._is_free[block_ids].any() or np.unique(block_ids).shape[0] != count:
            raise BlockAccountingError(f"KV blocks freed twice: {block_ids.tolist()}")
        self._is_free[block_ids] = True
        self._stack[self._num_free : self._num_free + count] = block_ids[::-1]
        self._num_free += count

    def all_free(self) -> bool:
        return self._num_free == self.num_blocks

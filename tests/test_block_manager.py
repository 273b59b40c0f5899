"""Unit tests for the KV block free stack (pure numpy, no MPI)."""

import numpy as np
import pytest

from ppruntime.engine.block_manager import BlockAccountingError, BlockManager


def ids(*values):
    return np.array(values, dtype=np.int32)


@pytest.mark.parametrize("num_blocks, block_size", [(0, 4), (4, 0), (-1, 4), (4, -2)])
def test_rejects_bad_sizes(num_blocks, block_size):
    with pytest.raises(ValueError):
        BlockManager(num_blocks, block_size)


def test_fresh_manager_is_all_free_and_allocates_in_order():
    manager = BlockManager(8, 4)
    assert manager.num_free_blocks == 8 and manager.all_free()
    first = manager.allocate(3)
    assert first.dtype == np.intp  # block ids index the free mask and the KV cache
    assert first.tolist() == [0, 1, 2]
    assert manager.allocate(2).tolist() == [3, 4]
    assert manager.num_free_blocks == 3 and not manager.all_free()


def test_allocate_returns_a_copy():
    manager = BlockManager(4, 4)
    taken = manager.allocate(2)
    taken[:] = 99
    assert manager.allocate(2).tolist() == [2, 3]


def test_allocate_zero_is_empty_and_changes_nothing():
    manager = BlockManager(4, 4)
    assert manager.allocate(0).shape == (0,)
    assert manager.num_free_blocks == 4
    manager.take(np.zeros(0, dtype=np.int32))
    assert manager.num_free_blocks == 4


def test_negative_count_is_rejected():
    manager = BlockManager(4, 4)
    with pytest.raises((ValueError, BlockAccountingError)):
        manager.allocate(-1)
    assert manager.num_free_blocks == 4


def test_over_allocation_raises_without_changing_state():
    manager = BlockManager(4, 4)
    manager.allocate(3)
    assert manager.can_allocate(1) and not manager.can_allocate(2)
    with pytest.raises(BlockAccountingError):
        manager.allocate(2)
    assert manager.num_free_blocks == 1
    assert manager.allocate(1).tolist() == [3]
    assert manager.num_free_blocks == 0 and manager.can_allocate(0)


def test_last_freed_block_is_reused_first():
    manager = BlockManager(6, 2)
    manager.allocate(6)
    manager.free(ids(4, 1))
    manager.free(ids(2))
    # the most recent free is on top; within one free call, the first id is on top
    assert manager.allocate(1).tolist() == [2]
    assert manager.allocate(2).tolist() == [4, 1]


def test_free_then_all_free():
    manager = BlockManager(5, 2)
    a = manager.allocate(2)
    b = manager.allocate(3)
    manager.free(b)
    manager.free(a)
    assert manager.all_free() and manager.num_free_blocks == 5


def test_free_empty_is_a_no_op():
    manager = BlockManager(3, 2)
    manager.free(np.zeros(0, dtype=np.int32))
    assert manager.num_free_blocks == 3


def test_double_free_is_detected():
    manager = BlockManager(4, 4)
    taken = manager.allocate(2)
    manager.free(taken)
    with pytest.raises(BlockAccountingError, match="twice"):
        manager.free(taken[:1])
    assert manager.num_free_blocks == 4


def test_freeing_a_never_allocated_block_is_detected():
    manager = BlockManager(4, 4)
    manager.allocate(1)
    with pytest.raises(BlockAccountingError):
        manager.free(ids(3))


def test_duplicate_ids_in_one_free_are_detected():
    manager = BlockManager(4, 4)
    manager.allocate(3)
    with pytest.raises(BlockAccountingError):
        manager.free(ids(1, 1))
    assert manager.num_free_blocks == 1


@pytest.mark.parametrize(
    "tokens, expected", [(0, 0), (1, 1), (3, 1), (4, 1), (5, 2), (8, 2), (9, 3)]
)
def test_blocks_for_tokens(tokens, expected):
    assert BlockManager(10, 4).blocks_for_tokens(tokens) == expected


def test_take_replays_rank0_allocation():
    rank0, replica = BlockManager(6, 4), BlockManager(6, 4)
    chosen = rank0.allocate(3)
    replica.take(chosen)
    assert replica.num_free_blocks == rank0.num_free_blocks
    assert replica.allocate(1).tolist() == rank0.allocate(1).tolist()


def test_take_detects_divergence():
    rank0, replica = BlockManager(6, 4), BlockManager(6, 4)
    rank0.allocate(2)
    rank0.free(ids(0))  # rank 0 now hands out 0 first, then 2
    with pytest.raises(BlockAccountingError, match="divergence"):
        replica.take(rank0.allocate(2))


def test_take_detects_wrong_order():
    replica = BlockManager(4, 4)
    with pytest.raises(BlockAccountingError):
        replica.take(ids(1, 0))


def test_take_more_than_free_raises():
    replica = BlockManager(2, 4)
    with pytest.raises(BlockAccountingError):
        replica.take(ids(0, 1, 2))


def test_random_replay_keeps_free_lists_identical():
    rng = np.random.default_rng(0)
    rank0, replica = BlockManager(32, 4), BlockManager(32, 4)
    held: list[np.ndarray] = []
    for _ in range(2000):
        if held and (rng.random() < 0.45 or rank0.num_free_blocks == 0):
            group = held.pop(int(rng.integers(len(held))))
            rank0.free(group)
            replica.free(group)
        else:
            count = int(rng.integers(0, rank0.num_free_blocks + 1))
            chosen = rank0.allocate(count)
            replica.take(chosen)
            if count:
                held.append(chosen)
        assert rank0.num_free_blocks == replica.num_free_blocks
        n = rank0.num_free_blocks
        assert np.array_equal(rank0._stack[:n], replica._stack[:n])
        assert np.array_equal(rank0._is_free, replica._is_free)
        in_use = np.concatenate(held) if held else np.zeros(0, dtype=np.int32)
        assert np.unique(in_use).shape[0] == in_use.shape[0]
        assert in_use.shape[0] + n == 32
        assert not rank0._is_free[in_use].any()
    for group in held:
        rank0.free(group)
    assert rank0.all_free()


@pytest.mark.parametrize("bad", [-1, 4, 100])
def test_freeing_out_of_range_ids_is_detected(bad):
    manager = BlockManager(4, 4)
    manager.allocate(4)
    with pytest.raises(BlockAccountingError, match="range"):
        manager.free(ids(bad))
    assert manager.num_free_blocks == 0

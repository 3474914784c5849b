"""Tests for the bitmap block allocator: exact ids, exhaustion, reuse, invariant checks."""

import random

import pytest

from ember.kv_cache.block_allocator import BlockAllocator


def _allocate(allocator: BlockAllocator) -> int:
    block_id = allocator.allocate()
    allocator.check_invariants()
    return block_id


def _free(allocator: BlockAllocator, block_id: int) -> None:
    allocator.free(block_id)
    allocator.check_invariants()


def test_allocates_lowest_ids_first():
    allocator = BlockAllocator(5)
    allocator.check_invariants()
    assert [_allocate(allocator) for _ in range(3)] == [0, 1, 2]
    assert allocator.num_free == 2
    assert allocator.num_allocated == 3
    assert allocator.is_allocated(2) and not allocator.is_allocated(3)


def test_exhaustion_across_several_words():
    # 130 blocks: two full 64-bit words and a third holding only 2 real bits.
    allocator = BlockAllocator(130)
    assert [_allocate(allocator) for _ in range(130)] == list(range(130))
    assert allocator.num_free == 0
    with pytest.raises(RuntimeError, match="all 130 blocks"):
        allocator.allocate()
    allocator.check_invariants()


def test_freed_middle_blocks_come_back_lowest_first():
    allocator = BlockAllocator(130)
    for _ in range(130):
        _allocate(allocator)
    for block_id in (128, 70, 5, 63, 64):
        _free(allocator, block_id)
    assert allocator.num_free == 5
    assert [_allocate(allocator) for _ in range(5)] == [5, 63, 64, 70, 128]
    assert allocator.num_free == 0


def test_free_below_hint_moves_search_back():
    allocator = BlockAllocator(200)
    for _ in range(150):
        _allocate(allocator)
    _free(allocator, 3)
    assert _allocate(allocator) == 3
    assert _allocate(allocator) == 150


def test_double_free_and_out_of_range_are_rejected():
    allocator = BlockAllocator(70)
    block_id = _allocate(allocator)
    _free(allocator, block_id)
    with pytest.raises(ValueError, match="not allocated"):
        allocator.free(block_id)
    with pytest.raises(ValueError, match="outside"):
        allocator.free(70)
    with pytest.raises(ValueError, match="outside"):
        allocator.is_allocated(-1)
    allocator.check_invariants()


@pytest.mark.parametrize("num_blocks", [0, -3, 2.5])
def test_rejects_bad_pool_size(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        BlockAllocator(num_blocks)


def test_invariant_check_catches_corruption():
    allocator = BlockAllocator(66)
    _allocate(allocator)
    allocator._words[1] |= 1 << 5  # a bit past block 65
    with pytest.raises(AssertionError, match="beyond block 65"):
        allocator.check_invariants()
    allocator._words[1] = 0
    allocator._num_free -= 1  # counter no longer matches the bitmap
    with pytest.raises(AssertionError, match="bits set"):
        allocator.check_invariants()


def test_random_against_reference_set():
    rng = random.Random(0)
    allocator = BlockAllocator(150)
    free_ids = set(range(150))
    for _ in range(2000):
        if free_ids and (rng.random() < 0.55 or len(free_ids) == 150):
            assert _allocate(allocator) == min(free_ids)
            free_ids.remove(min(free_ids))
        else:
            block_id = rng.choice(sorted(set(range(150)) - free_ids))
            _free(allocator, block_id)
            free_ids.add(block_id)
        assert allocator.num_free == len(free_ids)

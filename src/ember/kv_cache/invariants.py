"""The consistency check of `KVCacheManager`'s state, which tests run after every operation: tables, reference
counts, cached and evictable blocks, the allocator's bits and the running counters agree."""

from __future__ import annotations


def check_manager_invariants(manager) -> None:
    """Raise AssertionError describing the first inconsistency of a `KVCacheManager`'s state."""
    manager._allocator.check_invariants()
    for index in manager._indexes:
        index.check_invariants(manager.block_size)
        assert manager.enable_prefix_caching or len(index) == 0, "cached blocks with caching off"
    expected_refs = [0] * manager.num_blocks
    for request_id, tables in manager._block_tables.items():
        assert len({len(t) for t in tables}) == 1, f"request {request_id!r}: tables of unequal length"
        listed = [b for t in tables for b in t if b is not None]
        assert len(set(listed)) == len(listed), f"request {request_id!r} lists a block twice"
        assert None not in tables[0], f"request {request_id!r}: a global table let a block go"
        for block_id in listed:
            expected_refs[block_id] += 1
        for index, table, uids in zip(manager._indexes, tables, manager._block_uids.get(request_id, [])):
            assert len(uids) <= len(table), f"request {request_id!r} registered past its table"
            for block_id, uid in zip(table, uids):
                content = index.get(block_id) if block_id is not None else None
                assert content is None or content.uid == uid, (
                    f"request {request_id!r}: block {block_id} uid {content.uid} != {uid}")
    assert set(manager._block_uids) <= set(manager._block_tables), "uids kept for a freed request"
    assert set(manager._num_covered_tokens) <= set(manager._block_tables), "tokens kept for a freed request"
    empty = [manager._empty_slots(request_id) for request_id in manager._num_covered_tokens]
    assert min(empty, default=0) >= 0, "a table covers fewer slots than its tokens"
    assert sum(empty) == manager._num_empty_slots, (
        f"{sum(empty)} empty slots in the tables but {manager._num_empty_slots} counted")
    num_listed = sum(b is not None for tables in manager._block_tables.values() for t in tables for b in t)
    assert num_listed == manager._num_table_blocks, (
        f"{num_listed} blocks listed by the tables but {manager._num_table_blocks} counted")
    _check_block_states(manager, expected_refs)


def _check_block_states(manager, expected_refs: list[int]) -> None:
    """Each block's reference count, evictable and cached state and allocator bit agree."""
    num_used = 0
    for block_id, (refs, expected) in enumerate(zip(manager._ref_counts, expected_refs)):
        assert refs == expected, f"block {block_id} ref count {refs}, tables hold {expected}"
        is_used = refs > 0
        is_evictable = block_id in manager._evictable
        num_used += is_used
        assert not (is_used and is_evictable), f"block {block_id} used yet evictable"
        num_indexes = sum(block_id in index for index in manager._indexes)
        assert num_indexes <= 1, f"block {block_id} cached by {num_indexes} groups"
        assert is_evictable == (not is_used and num_indexes == 1), (
            f"block {block_id}: evictable={is_evictable}, refs={refs}, cached={num_indexes == 1}")
        assert manager._allocator.is_allocated(block_id) == (is_used or is_evictable), (
            f"block {block_id}: allocator bit disagrees with refs={refs}, "
            f"evictable={is_evictable}")
    assert num_used == manager._num_used_blocks, (
        f"{num_used} blocks referenced but {manager._num_used_blocks} counted")
    assert manager._allocator.num_free + len(manager._evictable) + num_used == manager.num_blocks, (
        "free + evictable + used blocks do not add up to num_blocks")

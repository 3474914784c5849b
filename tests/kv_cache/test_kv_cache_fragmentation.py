"""KVCacheManager's blocks-in-use, table-block, peak and internal-fragmentation counters, with exact numbers."""

import pytest

from ember.kv_cache.kv_cache_manager import KVCacheManager
from test_kv_cache_manager import allocate, free, lookup, make_request

BS = 4


def _step(request, num_new):
    """The runner computed the scheduled tokens; the last one sampled a new token."""
    request.num_computed_tokens += num_new
    if request.num_computed_tokens == request.num_tokens:
        request.append_output_token_id(9)


def _stats(manager):
    return manager.num_used_blocks, manager.fragmentation


def test_fragmentation_counts_empty_tail_slots_of_used_blocks():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    assert _stats(manager) == (0, 0.0)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert allocate(manager, a, 5)
    assert _stats(manager) == (2, 3 / 8)  # 5 tokens in 2 blocks of 4
    _step(a, 5)
    assert allocate(manager, a, 1)  # decode: the 6th token fills one more slot
    assert _stats(manager) == (2, 2 / 8)
    _step(a, 1)
    b = make_request("b", list(range(20, 30)))
    assert allocate(manager, b, 3)  # a chunk of b's prompt: 3 of 10 tokens
    assert _stats(manager) == (3, (2 + 1) / 12)
    _step(b, 3)
    assert allocate(manager, b, 7)  # the rest: 10 tokens in 3 blocks
    assert _stats(manager) == (5, (2 + 2) / 20)
    free(manager, a)
    assert _stats(manager) == (3, 2 / 12)
    free(manager, b)
    assert _stats(manager) == (0, 0.0)


def test_shared_prefix_blocks_are_counted_once():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6])
    assert allocate(manager, a, 6)
    _step(a, 6)
    c = make_request("c", [1, 2, 3, 4, 5])  # shares a's first (full) block
    blocks, num_hit = lookup(manager, c)
    assert num_hit == 4
    assert allocate(manager, c, 1, blocks)
    # Blocks: a's two, c's own tail; empty slots: a 2, c 3.
    assert _stats(manager) == (3, (2 + 3) / 12)
    free(manager, a)  # the shared block stays used by c
    assert _stats(manager) == (2, 3 / 8)


def test_preemption_and_refused_allocation_keep_the_counters():
    manager = KVCacheManager(num_blocks=2, block_size=BS, enable_prefix_caching=False)
    a = make_request("a", [1, 2, 3, 4, 5])
    assert allocate(manager, a, 5)
    b = make_request("b", [7, 8])
    assert not allocate(manager, b, 2)  # no block left: nothing changes
    assert _stats(manager) == (2, 3 / 8)
    free(manager, a)  # preempted by recompute
    a.num_computed_tokens = 0
    assert allocate(manager, b, 2)
    assert _stats(manager) == (1, pytest.approx(2 / 4))


def test_peak_usage_counts_shared_blocks_once_and_per_table():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    a = make_request("a", [1, 2, 3, 4, 5, 6])
    assert allocate(manager, a, 6)
    _step(a, 6)
    manager.reset_peak_usage()
    assert manager.peak_usage == (2, 2)
    beams = [make_request(f"b{i}", [1, 2, 3, 4, 5, 6, 10 + i]) for i in range(3)]  # a's full block, then own
    for beam in beams:
        blocks, num_hit = lookup(manager, beam)
        assert (blocks, num_hit) == (manager.get_block_ids("a")[:1], 4)
        assert allocate(manager, beam, 3, blocks)
    assert (manager.num_used_blocks, manager.num_table_blocks) == (5, 8)  # 1 shared + 4 own; 2 + 3 * 2 listed
    for request in [a, *beams]:
        free(manager, request)
    assert (manager.num_used_blocks, manager.num_table_blocks) == (0, 0)
    assert manager.peak_usage == (5, 8)  # the peaks stay until the next reset
    manager.reset_peak_usage()
    assert manager.peak_usage == (0, 0)

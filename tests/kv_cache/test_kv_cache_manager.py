"""Tests for KVCacheManager: block tables, ref counts, prefix hits, eviction order, collisions."""

import random

import pytest

from ember.kv_cache.block_hash import BlockHashIndex, hash_block_tokens
from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.request import Request
from ember.sampling_params import SamplingParams

BS = 4  # block size used throughout


def make_request(request_id, token_ids, cache_salt=None):
    return Request(request_id, token_ids, SamplingParams(), cache_salt=cache_salt)


def lookup(manager, request):
    result = manager.get_computed_blocks(request)
    manager.check_invariants()
    return result


def allocate(manager, request, num_new_tokens, new_computed_blocks=None):
    ok = manager.allocate_slots(request, num_new_tokens, new_computed_blocks)
    manager.check_invariants()
    return ok


def free(manager, request):
    manager.free(request)
    manager.check_invariants()


def admit(manager, request):
    """Look up the prefix cache, allocate the rest of the prompt, and mark it computed."""
    block_ids, num_hit = lookup(manager, request)
    if not allocate(manager, request, request.num_tokens - num_hit, block_ids):
        return False
    request.num_computed_tokens = request.num_tokens
    return True


def decode(manager, request, token_id):
    """Append one sampled token and give it a slot, as one decode step does."""
    request.append_output_token_id(token_id)
    ok = allocate(manager, request, 1)
    if ok:
        request.num_computed_tokens += 1
    return ok


def state(manager):
    """Everything `allocate_slots` may touch, to prove a refusal changed nothing."""
    return (list(manager._allocator._words), manager._allocator.num_free,
            list(manager._evictable), list(manager._ref_counts), manager._num_used_blocks,
            {rid: [list(t) for t in tables] for rid, tables in manager._block_tables.items()},
            {rid: [list(u) for u in uids] for rid, uids in manager._block_uids.items()},
            {b: manager._index.get(b) for b in range(manager.num_blocks)})


def test_prefix_hit_shares_blocks_and_counts_refs():
    manager = KVCacheManager(num_blocks=10, block_size=BS)
    r0 = make_request("r0", list(range(10)))
    assert admit(manager, r0)
    assert manager.get_block_ids("r0") == [0, 1, 2]
    r1 = make_request("r1", list(range(8)) + [100, 101])
    assert lookup(manager, r1) == ([0, 1], 8)
    assert allocate(manager, r1, 2, [0, 1])
    assert manager.get_block_ids("r1") == [0, 1, 3]
    assert [manager.get_ref_count(b) for b in range(4)] == [2, 2, 1, 1]
    assert manager.usage == pytest.approx(4 / 10)
    assert manager.num_free_blocks == 6
    assert (manager.num_queried_tokens, manager.num_hit_tokens) == (20, 8)
    assert manager.hit_rate == pytest.approx(0.4)


def test_partial_hit_uses_only_full_blocks():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    assert admit(manager, make_request("r0", list(range(10))))
    # Shares tokens 0..5: block 0 is full and matches, block 1 diverges mid-block.
    r1 = make_request("r1", list(range(6)) + [50, 51, 52, 53])
    assert lookup(manager, r1) == ([0], 4)
    assert allocate(manager, r1, 6, [0])
    assert manager.get_block_ids("r1") == [0, 3, 4]


def test_full_prompt_hit_leaves_one_token_to_compute():
    manager = KVCacheManager(num_blocks=6, block_size=BS)
    r0 = make_request("r0", list(range(8)))
    assert admit(manager, r0)
    assert manager.get_block_ids("r0") == [0, 1]
    r1 = make_request("r1", list(range(8)))
    assert lookup(manager, r1) == ([0], 4)  # both blocks cached, but 8 tokens cap it at one
    assert allocate(manager, r1, 4, [0])
    assert manager.get_block_ids("r1") == [0, 2]
    # Block 2 recomputes what block 1 caches: it stays an uncached twin, not a duplicate entry.
    free(manager, r0)
    free(manager, r1)
    assert manager.num_free_blocks == 6
    assert manager.usage == 0.0
    assert manager._allocator.is_allocated(0) and manager._allocator.is_allocated(1)
    assert not manager._allocator.is_allocated(2)


def test_eviction_is_lru_and_tail_first():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    r0 = make_request("r0", list(range(9)))
    assert admit(manager, r0)
    assert manager.get_block_ids("r0") == [0, 1, 2]
    free(manager, r0)  # block 2 (partial) is freed; blocks 1 then 0 become evictable
    assert list(manager._evictable) == [1, 0]
    assert manager.num_free_blocks == 4 and manager.usage == 0.0
    r1 = make_request("r1", list(range(100, 109)))
    assert admit(manager, r1)
    assert manager.get_block_ids("r1") == [2, 3, 1]  # clean blocks first, then r0's tail
    r2 = make_request("r2", list(range(9)))
    assert lookup(manager, r2) == ([0], 4)  # r0's head survived its tail
    r3 = make_request("r3", list(range(200, 205)))
    free(manager, r1)  # r1's full blocks join the LRU end, tail first; its partial block 1 is freed
    assert list(manager._evictable) == [0, 3, 2]
    assert admit(manager, r3)
    assert manager.get_block_ids("r3") == [1, 0]  # the clean block, then the oldest cached one
    assert lookup(manager, r2) == ([], 0)


def test_hit_refreshes_lru_position():
    manager = KVCacheManager(num_blocks=3, block_size=BS)
    a, b = make_request("a", [1, 2, 3, 4, 5]), make_request("b", [6, 7, 8, 9])
    assert admit(manager, a) and admit(manager, b)
    assert (manager.get_block_ids("a"), manager.get_block_ids("b")) == ([0, 1], [2])
    free(manager, a)
    free(manager, b)
    a2 = make_request("a2", [1, 2, 3, 4, 11])
    assert admit(manager, a2)  # hits block 0 and revives it
    assert manager.get_block_ids("a2") == [0, 1]
    free(manager, a2)
    assert list(manager._evictable) == [2, 0]
    c = make_request("c", [20, 21, 22, 23, 24, 25])
    assert admit(manager, c)
    assert manager.get_block_ids("c") == [1, 2]  # b's block went before the refreshed block 0
    assert lookup(manager, make_request("a3", [1, 2, 3, 4, 12])) == ([0], 4)


@pytest.mark.parametrize("hash_fn", [None, lambda parent, tokens, salt: 7])
def test_salt_isolates_caches(hash_fn):
    manager = KVCacheManager(num_blocks=12, block_size=BS, hash_fn=hash_fn)
    tokens = list(range(9))
    assert admit(manager, make_request("r0", tokens, cache_salt="alice"))
    assert lookup(manager, make_request("r1", tokens, cache_salt="bob")) == ([], 0)
    assert lookup(manager, make_request("r2", tokens)) == ([], 0)
    assert lookup(manager, make_request("r3", tokens, cache_salt="alice")) == ([0, 1], 8)


def test_collisions_never_serve_wrong_blocks():
    manager = KVCacheManager(num_blocks=12, block_size=BS, hash_fn=lambda parent, tokens, salt: 0)
    a, b = [1, 1, 1, 1, 2, 2, 2, 2, 0], [3, 3, 3, 3, 4, 4, 4, 4, 0]
    assert admit(manager, make_request("a", a))
    assert lookup(manager, make_request("b", b)) == ([], 0)
    assert admit(manager, make_request("b", b))
    assert manager.get_block_ids("b") == [3, 4, 5]
    assert lookup(manager, make_request("a2", a)) == ([0, 1], 8)
    assert lookup(manager, make_request("b2", b)) == ([3, 4], 8)
    # Block 1's tokens under b's first block: the parent differs, so only block 3 matches.
    assert lookup(manager, make_request("mix", b[:4] + a[4:])) == ([3], 4)


def test_refilled_parent_does_not_revive_old_children():
    index = BlockHashIndex()
    head, tail = (1, 2, 3, 4), (5, 6, 7, 8)
    first = index.insert(0, 0, None, head, None)
    index.insert(1, 0, first.uid, tail, None)
    index.remove(0)
    again = index.insert(0, 0, None, head, None)  # same content, fresh KV, fresh prefix uid
    assert again.uid != first.uid
    assert index.lookup(0, again.uid, tail, None) is None
    assert index.lookup(0, first.uid, tail, None) == 1
    index.check_invariants(BS)
    with pytest.raises(ValueError, match="already cached"):
        index.insert(2, 0, None, head, None)


def test_failed_allocation_changes_nothing():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    r0 = make_request("r0", list(range(9)))
    assert admit(manager, r0)
    free(manager, r0)  # evictable [1, 0], free {2, 3}
    # 17 tokens: hits blocks 0 and 1, needs 3 more; only 2 are available once 0 and 1 are revived.
    r1 = make_request("r1", list(range(17)))
    block_ids, num_hit = lookup(manager, r1)
    assert (block_ids, num_hit) == ([0, 1], 8)
    before = state(manager)
    assert not allocate(manager, r1, 9, block_ids)
    assert state(manager) == before
    assert manager.get_block_ids("r1") == []
    # One token fewer fits exactly, and must not evict its own hit blocks.
    r2 = make_request("r2", list(range(16)))
    assert lookup(manager, r2) == ([0, 1], 8)
    assert allocate(manager, r2, 8, [0, 1])
    r2.num_computed_tokens = 16
    assert manager.get_block_ids("r2") == [0, 1, 2, 3]
    before = state(manager)
    assert not decode(manager, r2, 99)
    assert state(manager) == before


def test_refs_and_usage_return_to_zero_after_parallel_samples():
    manager = KVCacheManager(num_blocks=16, block_size=BS)
    prompt = list(range(10))
    samples = [make_request(f"p-{i}", prompt) for i in range(3)]
    for sample in samples:
        assert admit(manager, sample)
    assert [manager.get_block_ids(s.request_id) for s in samples] == [
        [0, 1, 2], [0, 1, 3], [0, 1, 4]]
    assert [manager.get_ref_count(b) for b in range(5)] == [3, 3, 1, 1, 1]
    for step in range(4):
        for i, sample in enumerate(samples):
            assert decode(manager, sample, 1000 * i + step)
    assert [manager.get_block_ids(s.request_id) for s in samples] == [
        [0, 1, 2, 5], [0, 1, 3, 6], [0, 1, 4, 7]]
    assert manager.usage == pytest.approx(8 / 16)
    for sample in samples:
        free(manager, sample)
    assert manager.usage == 0.0
    assert all(manager.get_ref_count(b) == 0 for b in range(16))
    assert manager.num_free_blocks == 16


def test_decode_grows_across_block_boundaries():
    manager = KVCacheManager(num_blocks=8, block_size=BS)
    r0 = make_request("r0", [10, 11, 12])
    assert admit(manager, r0)
    tables = [manager.get_block_ids("r0")]
    for token_id in range(13, 19):
        assert decode(manager, r0, token_id)
        tables.append(manager.get_block_ids("r0"))
    # Tokens 3, 4, ..., 9 held after each step: a new block at 5 and 9 tokens.
    assert tables == [[0], [0], [0, 1], [0, 1], [0, 1], [0, 1], [0, 1, 2]]
    assert r0.num_computed_tokens == 9
    assert lookup(manager, make_request("r1", list(range(10, 19)) + [0])) == ([0, 1], 8)


def test_prefix_caching_off():
    manager = KVCacheManager(num_blocks=4, block_size=BS, enable_prefix_caching=False)
    r0 = make_request("r0", list(range(9)))
    assert admit(manager, r0)
    free(manager, r0)
    assert manager._allocator.num_free == 4 and not manager._evictable
    r1 = make_request("r1", list(range(9)))
    assert lookup(manager, r1) == ([], 0)
    assert manager.num_queried_tokens == 0
    with pytest.raises(ValueError, match="caching is off"):
        manager.allocate_slots(r1, 1, [0])


def test_reset_prefix_cache():
    manager = KVCacheManager(num_blocks=6, block_size=BS)
    r0 = make_request("r0", list(range(9)))
    assert admit(manager, r0)
    assert not manager.reset_prefix_cache()
    manager.check_invariants()
    free(manager, r0)
    assert manager.reset_prefix_cache()
    manager.check_invariants()
    assert manager._allocator.num_free == 6
    assert lookup(manager, make_request("r1", list(range(9)))) == ([], 0)


def test_stale_or_misplaced_computed_blocks_are_rejected():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    r0 = make_request("r0", list(range(9)))
    assert admit(manager, r0)
    free(manager, r0)
    r1 = make_request("r1", list(range(9)))
    block_ids, _ = lookup(manager, r1)
    assert admit(manager, make_request("other", list(range(50, 63))))  # evicts blocks 1 then 0
    with pytest.raises(ValueError, match="no longer holds"):
        manager.allocate_slots(r1, 1, block_ids)
    manager.check_invariants()
    other = make_request("other", list(range(50, 63)))
    r2 = make_request("r2", list(range(50, 63)))
    block_ids, _ = lookup(manager, r2)
    assert block_ids == [2, 3, 1]  # other's full blocks, still in use
    with pytest.raises(ValueError, match="already holds blocks"):
        manager.allocate_slots(other, 1, block_ids)
    assert not allocate(manager, r2, 1, block_ids)  # the last token needs a fifth block
    free(manager, other)
    assert allocate(manager, r2, 1, block_ids)
    assert manager.get_block_ids("r2") == [2, 3, 1, 0]
    assert [manager.get_ref_count(b) for b in range(4)] == [1, 1, 1, 1]


@pytest.mark.parametrize("num_blocks", [0, -1])
def test_rejects_bad_sizes(num_blocks):
    with pytest.raises(ValueError, match="num_blocks"):
        KVCacheManager(num_blocks=num_blocks, block_size=BS)
    with pytest.raises(ValueError, match="block_size"):
        KVCacheManager(num_blocks=4, block_size=num_blocks)


def test_invariant_check_catches_a_leaked_reference():
    manager = KVCacheManager(num_blocks=4, block_size=BS)
    assert admit(manager, make_request("r0", [1, 2, 3]))
    manager._ref_counts[0] += 1
    with pytest.raises(AssertionError, match="ref count"):
        manager.check_invariants()


def _weak_hash(parent_hash, token_ids, salt):
    return hash_block_tokens(parent_hash, token_ids, salt) % 3  # collides constantly


class _StressRun:
    """Random admits, chunked prefills, decodes, preemptions and frees on a tiny pool.

    A shadow of each block's KV (the full token prefix it was computed for) proves every hit
    serves exactly the KV the request would have computed.
    """

    def __init__(self, seed, hash_fn):
        self.rng = random.Random(seed)
        self.manager = KVCacheManager(num_blocks=12, block_size=BS, hash_fn=hash_fn)
        self.prefixes = [[self.rng.randrange(5) for _ in range(9)] for _ in range(3)]
        self.kv = {}  # block id -> token prefix whose KV it holds
        self.waiting, self.running = [], []
        self.num_created = 0

    def new_request(self):
        prompt = self.rng.choice(self.prefixes)[:self.rng.randrange(1, 10)]
        prompt += [self.rng.randrange(5) for _ in range(self.rng.randrange(0, 6))]
        self.num_created += 1
        salt = self.rng.choice([None, None, "s"])
        return make_request(f"q{self.num_created}", prompt or [0], cache_salt=salt)

    def write_kv(self, request):
        table = self.manager.get_block_ids(request.request_id)
        for i in range(request.num_computed_tokens // BS):
            self.kv[table[i]] = (request.cache_salt, tuple(request.all_token_ids[:(i + 1) * BS]))

    def admit(self):
        request = self.waiting.pop(0) if self.waiting and self.rng.random() < 0.5 \
            else self.new_request()
        block_ids, num_hit = lookup(self.manager, request)
        for i, block_id in enumerate(block_ids):
            expected = (request.cache_salt, tuple(request.all_token_ids[:(i + 1) * BS]))
            assert self.kv[block_id] == expected, f"block {block_id} serves wrong KV"
        chunk = self.rng.randrange(1, request.num_tokens - num_hit + 1)
        if allocate(self.manager, request, chunk, block_ids):
            request.num_computed_tokens = num_hit + chunk
            self.write_kv(request)
            self.running.append(request)
        else:
            assert self.manager.get_block_ids(request.request_id) == []
            free(self.manager, request)

    def step(self):
        request = self.rng.choice(self.running)
        if request.num_computed_tokens == request.num_tokens:
            if request.num_tokens >= 24:
                return self.finish(request)
            request.append_output_token_id(self.rng.randrange(5))
        chunk = self.rng.randrange(1, request.num_tokens - request.num_computed_tokens + 1)
        if allocate(self.manager, request, chunk):
            request.num_computed_tokens += chunk
            self.write_kv(request)
        else:  # preempt: drop everything and recompute later
            self.finish(request)
            request.num_computed_tokens = 0
            self.waiting.append(request)

    def finish(self, request):
        self.running.remove(request)
        free(self.manager, request)

    def run(self, num_ops):
        for _ in range(num_ops):
            roll = self.rng.random()
            if not self.running or roll < 0.3:
                self.admit()
            elif roll < 0.85:
                self.step()
            elif roll < 0.98:
                self.finish(self.rng.choice(self.running))
            else:
                assert self.manager.reset_prefix_cache() == (self.manager.usage == 0.0)
                self.manager.check_invariants()
        for request in list(self.running):
            self.finish(request)
        assert self.manager.usage == 0.0
        assert self.manager.num_free_blocks == self.manager.num_blocks


@pytest.mark.parametrize("hash_fn", [None, _weak_hash])
@pytest.mark.parametrize("seed", range(4))
def test_randomized_stress(seed, hash_fn):
    run = _StressRun(seed, hash_fn)
    run.run(600)
    assert run.manager.num_hit_tokens > 0

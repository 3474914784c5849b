"""The KV pool (LRU by bytes, leading-run lookups), the KV-cache manager's externally filled blocks, the
runner's block rows, and a KV transfer between two engines checked against Hugging Face's greedy tokens."""

import numpy as np
import pytest
import torch

from ember.attention.layer_cache import KVCacheSpec
from ember.config import EngineConfig
from ember.distributed.block_keys import block_keys
from ember.distributed.kv_pool import KVPool, as_segments, create_kv_pool
from ember.distributed.kv_transfer import PREFILL_PARAMS, KVTransfer
from ember.engine.llm_engine import LLMEngine
from ember.engine.model_runner import ModelRunner
from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.request import Request
from ember.sampling_params import SamplingParams

KEYS = block_keys(list(range(64)), 8)  # 8 chained keys


def rows(n: int, nbytes: int = 4, fill: int = 0) -> np.ndarray:
    return (np.arange(n * nbytes, dtype=np.uint8) + fill).reshape(n, nbytes)


# ---- the pool ----------------------------------------------------------------------------------
def test_lookup_counts_the_leading_present_keys_only():
    pool = KVPool(1000)
    chunk = rows(3)
    assert pool.put([KEYS[0], KEYS[1], KEYS[3]], chunk, 4) == 3
    assert pool.lookup(KEYS) == 2  # KEYS[2] is missing: KEYS[3] cannot serve a prefix
    assert pool.get(KEYS[:4]) == [(chunk, 0), (chunk, 1)]
    stats = pool.stats()
    assert (stats.num_blocks, stats.num_bytes, stats.num_queried_blocks, stats.num_hit_blocks) == (3, 12, 4, 2)


def test_eviction_takes_whole_chunks_the_prefix_tail_first_and_keeps_old_copies():
    pool = KVPool(4 * 4)  # four 4-byte blocks
    head, tail = rows(2, fill=0), rows(2, fill=100)
    pool.put(KEYS[:2], head, 4)
    pool.put(KEYS[2:4], tail, 4)  # one prefix exported in two chunks
    assert pool.put(KEYS[:2], rows(2, fill=200), 4) == 0  # present keys keep their old copy
    assert pool.get(KEYS[:4]) == [(head, 0), (head, 1), (tail, 0), (tail, 1)]
    other = block_keys(list(range(100, 108)), 8)
    assert pool.put(other, rows(1), 4) == 1  # needs one block's room: the prefix's tail chunk goes whole
    assert pool.lookup(KEYS) == 2 and pool.lookup(other) == 1
    assert pool.stats().num_evicted_blocks == 2 and pool.stats().num_bytes == 12


def test_a_chunk_counts_whole_while_any_key_holds_it():
    # the bytes of a chunk are freed only with its last key: a pool that counted blocks would let chunks
    # whose heads outlive their tails hold more than its capacity
    pool = KVPool(4 * 4)
    chunk = rows(4)
    pool.put(KEYS[:4], chunk, 4)
    pool.drop(KEYS[1:4])
    assert pool.lookup(KEYS) == 1 and pool.stats().num_bytes == 16
    assert pool.put(block_keys(list(range(100, 108)), 8), rows(1), 4) == 1  # room only by evicting the chunk
    assert pool.lookup(KEYS) == 0 and pool.stats().num_bytes == 4
    pool.drop(block_keys(list(range(100, 108)), 8))
    assert pool.stats().num_bytes == 0 and pool.stats().num_blocks == 0
    pool.put(KEYS[:2], chunk[:2], 4)
    shared = pool.get(KEYS)[0][0]
    assert pool.put(KEYS[2:4], shared, 4) == 2 and pool.stats().num_bytes == 8  # one array, counted once
    pool.drop(KEYS[:4])
    assert pool.stats().num_bytes == 0


def test_a_put_larger_than_the_pool_keeps_what_fits_and_drop_forgets():
    pool = KVPool(2 * 4)
    big = rows(3)
    assert pool.put(KEYS[:3], big, 4) == 2
    assert pool.lookup(KEYS) == 2 and pool.stats().num_bytes == 8
    stored = pool.get(KEYS)[0][0]
    assert not np.shares_memory(stored, big) and (stored == big[:2]).all()  # a copy: the third row is freed
    assert pool.put(KEYS[4:7], object(), 4) == 0  # a chunk it cannot cut (an object-store ref) stays out
    pool.drop([KEYS[0]])
    assert pool.lookup(KEYS) == 0 and pool.stats().num_bytes == 8
    pool.drop([KEYS[1]])
    assert pool.stats().num_bytes == 0
    with pytest.raises(ValueError, match="positive"):
        KVPool(0)


def test_segments_are_runs_of_one_chunk_without_copies():
    a, b = rows(4, fill=1), rows(2, fill=50)
    segments = as_segments([(a, 1), (a, 2), (b, 0), (b, 1), (a, 0)], lambda chunks: chunks)
    assert [s.shape[0] for s in segments] == [2, 2, 1]
    assert np.shares_memory(segments[0], a) and (segments[0] == a[1:3]).all()
    assert (segments[2] == a[0:1]).all()


def test_the_mp_pool_serves_across_processes():
    client, shutdown = create_kv_pool("mp", 1000)
    try:
        client.put(KEYS[:3], rows(3, fill=7))
        assert client.lookup(KEYS) == 3
        segments = client.get(KEYS)
        assert len(segments) == 1 and (segments[0] == rows(3, fill=7)).all()  # one chunk, sent once
    finally:
        shutdown()


# ---- the cache manager's externally filled blocks -----------------------------------------------
def make_request(request_id: str, token_ids: list[int], salt=None) -> Request:
    return Request(request_id, token_ids, SamplingParams(max_tokens=4), cache_salt=salt)


def test_inserted_blocks_are_found_by_a_requests_prefix_lookup():
    manager = KVCacheManager(num_blocks=8, block_size=4)
    tokens = list(range(100, 114))  # 3 full blocks + 2 tokens
    new = manager.insert_cached_blocks(tokens, 3, salt="s")
    manager.check_invariants()
    assert len(new) == 3 and manager.num_used_blocks == 0 and manager.num_free_blocks == 8
    assert manager.cached_prefix_blocks(tokens, "s") == new
    assert manager.cached_prefix_blocks(tokens, None) == []  # the salt keys the first block
    request = make_request("a", tokens, salt="s")
    assert manager.get_computed_blocks(request) == (new, 12)
    # Inserting again adds only the blocks not cached yet, chained after the cached head.
    longer = tokens[:12] + list(range(200, 206))
    assert len(manager.insert_cached_blocks(longer, 4, salt="s")) == 1
    manager.check_invariants()
    assert manager.cached_prefix_blocks(longer, "s")[:3] == new


def test_inserted_blocks_are_evicted_tail_first_and_a_full_cache_refuses():
    manager = KVCacheManager(num_blocks=4, block_size=4)
    tokens = list(range(16))
    new = manager.insert_cached_blocks(tokens, 3)
    holder = make_request("h", list(range(50, 55)))  # 2 blocks: one clean, one evicted
    assert manager.allocate_slots(holder, 5)
    manager.check_invariants()
    assert manager.cached_prefix_blocks(tokens) == new[:2]  # the tail went first
    with pytest.raises(ValueError, match="free"):
        manager.insert_cached_blocks(list(range(300, 316)), 4)  # 4 new blocks, 2 free
    manager.check_invariants()
    with pytest.raises(ValueError, match="prefix caching"):
        KVCacheManager(4, 4, enable_prefix_caching=False).insert_cached_blocks(tokens, 1)


# ---- the runner's block rows --------------------------------------------------------------------
def test_block_rows_round_trip_through_every_layer():
    spec = KVCacheSpec("auto", torch.float32, num_layers=2, num_kv_heads=2, head_dim=4, block_size=4)
    runner = ModelRunner(None, None, 4, spec)
    kv = torch.randn(2, 2, 2, 4, 2, 4)
    runner.write_kv_blocks([3, 1], kv)
    assert torch.equal(runner.read_kv_blocks([3, 1]), kv)
    assert torch.equal(runner.kv_caches[1].value[1], kv[1, 1, 1])
    with pytest.raises(ValueError, match="must be"):
        runner.write_kv_blocks([0], kv)
    int8 = ModelRunner(None, None, 4, KVCacheSpec("int8", torch.float32, 2, 2, 4, 4))
    with pytest.raises(ValueError, match="int8"):
        int8.read_kv_blocks([0])


# ---- a transfer between two engines -------------------------------------------------------------
def generate(engine: LLMEngine, request_id: str, token_ids: list[int], params: SamplingParams):
    engine.add_request(request_id, token_ids, params)
    final = None
    while engine.has_unfinished_requests():
        final = next((o for o in engine.step() if o.finished), final)
    return final


@pytest.fixture(scope="module")
def tiny_engines(tiny_llama_dir):
    config = EngineConfig(model=tiny_llama_dir, dtype="float32", max_model_len=256, num_kv_blocks=32, num_threads=1)
    return LLMEngine.from_config(config), LLMEngine.from_config(config)


class LostBytesPool:
    """A pool whose bytes are gone (their owner died): lookups still see the keys."""

    def __init__(self, pool) -> None:
        self.pool, self.dropped = pool, []

    def lookup(self, keys):
        return self.pool.lookup(keys)

    def get(self, keys):
        raise RuntimeError("owner died")

    def drop(self, keys):
        self.dropped.extend(keys)


def test_imported_blocks_decode_as_huggingface_does(tiny_engines, hf_greedy):
    prefill, decode = tiny_engines
    client, _ = create_kv_pool("local")
    prompt = [(7 * i) % 500 + 3 for i in range(45)]  # 2 usable full blocks of 16, and a tail
    generate(prefill, "p", prompt, PREFILL_PARAMS)
    exported = KVTransfer(prefill, client).export_blocks("p", prompt, None)
    assert (exported.num_blocks, exported.direction) == (2, "export")
    assert exported.num_bytes == 2 * (2 * 2 * 16 * 2 * 16 * 4)  # layers, K/V, rows, KV heads, head_dim, fp32
    imported = KVTransfer(decode, client).import_blocks("d", prompt, None)
    assert (imported.num_blocks, imported.num_bytes) == (2, exported.num_bytes)
    decode.kv_cache_manager.check_invariants()
    out = generate(decode, "d", prompt, SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    assert out.num_cached_tokens == 32  # served by the imported blocks, not recomputed
    assert out.outputs[0].token_ids == hf_greedy(prompt, 12)
    # Lost bytes are a miss: nothing installed, the keys dropped, the engine computes the prompt itself.
    other = [(11 * i) % 500 + 3 for i in range(40)]
    generate(prefill, "p2", other, PREFILL_PARAMS)
    KVTransfer(prefill, client).export_blocks("p2", other, None)
    lost = LostBytesPool(client)
    assert KVTransfer(decode, lost).import_blocks("d2", other, None).num_blocks == 0
    assert lost.dropped == block_keys(other, 16, max_blocks=2)
    out = generate(decode, "d2", other, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True))
    assert out.num_cached_tokens == 0 and out.outputs[0].token_ids == hf_greedy(other, 8)


def test_the_pool_size_comes_from_the_kv_transfer_config():
    from ember.distributed.config import ParallelConfig
    from ember.distributed.kv_pool import DEFAULT_KV_POOL_BYTES
    from ember.distributed.pd_engine import kv_pool_capacity

    assert kv_pool_capacity(ParallelConfig(pd_disaggregation=True)) == DEFAULT_KV_POOL_BYTES
    assert kv_pool_capacity(ParallelConfig(kv_transfer_config='{"kv_buffer_size": 1e6}')) == 1_000_000
    with pytest.raises(ValueError, match="kv_buffer_size"):
        kv_pool_capacity(ParallelConfig(kv_transfer_config='{"kv_buffer_size": -1}'))

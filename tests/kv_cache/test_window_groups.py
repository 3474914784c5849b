"""KV-cache groups: a local (sliding-window) group's table lets go of the blocks its window no longer reaches,
its blocks are cached and hit apart from the global group's, and every group's layers share one pool."""

import torch

from ember.attention.layer_cache import KVCacheSpec, create_layer_caches
from ember.kv_cache.groups import KVCacheGroup, kv_cache_groups
from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.models.config import ModelConfig
from ember.request import Request
from ember.sampling_params import SamplingParams

BS, WINDOW = 4, 6
SLIDING, FULL = "sliding_attention", "full_attention"


def make_request(request_id, token_ids):
    return Request(request_id, token_ids, SamplingParams())


def step(manager, request, num_new):
    """Schedule `num_new` tokens of the request (a prompt chunk) and mark them computed."""
    assert manager.allocate_slots(request, num_new)
    manager.check_invariants()
    request.num_computed_tokens += num_new


def decode(manager, request, token_id):
    request.append_output_token_id(token_id)
    step(manager, request, 1)


def admit(manager, request):
    hit, num_hit = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_hit, hit)
    manager.check_invariants()
    request.num_computed_tokens = request.num_tokens
    return hit, num_hit


def test_groups_split_local_from_global_layers_in_equal_widths():
    gemma_270m = tuple(FULL if (i + 1) % 6 == 0 else SLIDING for i in range(18))
    groups = kv_cache_groups(18, gemma_270m, 512)
    assert [g.window for g in groups] == [None] + [512] * 5
    assert [g.layers for g in groups] == [(5, 11, 17), (0, 1, 2), (3, 4, 6), (7, 8, 9), (10, 12, 13), (14, 15, 16)]
    assert kv_cache_groups(4, (SLIDING, SLIDING, FULL, SLIDING), 6) == (
        KVCacheGroup((2,)), KVCacheGroup((0,), 6), KVCacheGroup((1,), 6), KVCacheGroup((3,), 6))
    assert kv_cache_groups(3) == (KVCacheGroup((0, 1, 2)),)
    assert kv_cache_groups(2, (SLIDING, SLIDING), 6) == (KVCacheGroup((0, 1)),)  # no global layer: keep all


def test_local_table_lets_go_of_blocks_behind_its_window():
    manager = KVCacheManager(num_blocks=32, block_size=BS, enable_prefix_caching=False, windows=(None, WINDOW))
    request = make_request("r", list(range(10)))
    for num_new in (4, 4, 2):  # chunked prefill: a chunk reads rows from its first query's window on
        step(manager, request, num_new)
    assert manager.get_block_ids("r") == [0, 2, 4] and manager.get_group_block_ids("r") == [[1, 3, 5]]
    decode(manager, request, 7)  # the query at row 10 reads rows 5..10: block 0 is out of reach
    assert manager.get_group_block_ids("r") == [[None, 3, 5]]
    assert manager.num_used_blocks == 5 and manager.get_ref_count(1) == 0
    for token in range(20):
        decode(manager, request, token)
        local = manager.get_group_block_ids("r")[0]
        position = request.num_computed_tokens - 1
        assert len(local) == len(manager.get_block_ids("r")) == -(-(position + 1) // BS)
        # only the blocks holding rows position - 5 .. position stay
        assert [i for i, b in enumerate(local) if b is not None] == list(range((position - WINDOW + 1) // BS,
                                                                                position // BS + 1))
    assert manager.num_used_blocks == len(manager.get_block_ids("r")) + 2
    manager.free(request)
    manager.check_invariants()
    assert manager.num_free_blocks == 32


def test_local_blocks_are_cached_and_a_hit_needs_the_window_before_it():
    manager = KVCacheManager(num_blocks=40, block_size=BS, windows=(None, WINDOW))
    prompt = list(range(100, 116))  # 4 full blocks
    first = make_request("a", prompt)
    admit(manager, first)
    decode(manager, first, 1)  # from row 16 the window reaches back to row 11: local blocks 0 and 1 let go
    local_a = manager.get_group_block_ids("a")[0]
    assert local_a[:2] == [None, None]
    # A longer prompt with the same head: the global group hits 4 blocks, the local group needs blocks 2 and 3
    # (rows 11..15 before row 16), which "a" still holds.
    hit, num_hit = admit(manager, make_request("b", prompt + [5, 6]))
    assert num_hit == 16 and list(hit) == manager.get_block_ids("a")[:4]
    assert hit.windowed == [[None, None] + local_a[2:4]]
    assert manager.get_ref_count(local_a[2]) == 2
    # A prompt of 2 blocks + 1 token needs local blocks 0 and 1: let go by "a" but still cached (evictable).
    hit, num_hit = admit(manager, make_request("c", prompt[:8] + [9]))
    assert num_hit == 8 and hit.windowed[0][:2] != [None, None]


def test_a_hit_is_cut_back_when_a_local_block_of_its_window_was_evicted():
    manager = KVCacheManager(num_blocks=10, block_size=BS, windows=(None, WINDOW))
    prompt = list(range(100, 116))
    first = make_request("a", prompt)
    admit(manager, first)  # 8 blocks: 4 global, 4 local
    decode(manager, first, 1)  # local blocks 0, 1 let go (cached, evictable); the 2 clean blocks left are taken
    assert manager.num_free_blocks == 2 and manager.num_used_blocks == 8
    step(manager, make_request("filler", list(range(300, 304))), 4)  # 1 block per group: both evictable ones
    hit, num_hit = manager.get_computed_blocks(make_request("b", prompt[:8] + [9]))
    # the global group still caches blocks 0 and 1, but the local window before row 8 (rows 3..7) is gone
    assert num_hit == 0 and list(hit) == [] and hit.windowed == [[]]
    manager.check_invariants()


def test_truncate_and_blocks_needed_count_every_group():
    manager = KVCacheManager(num_blocks=32, block_size=BS, enable_prefix_caching=False, windows=(None, WINDOW, WINDOW))
    request = make_request("r", list(range(9)))
    step(manager, request, 9)
    assert manager.allocate_slots(request, 5)  # drafts: rows 9..13 in blocks 2 and 3
    manager.truncate(request, 10)  # two drafts accepted: rows up to 9 kept
    manager.check_invariants()
    assert [len(t) for t in [manager.get_block_ids("r"), *manager.get_group_block_ids("r")]] == [3, 3, 3]
    # from row 9 on, the window reaches back to row 4: each local group let go of its block 0
    assert [t[0] for t in manager.get_group_block_ids("r")] == [None, None] and manager.num_used_blocks == 3 + 2 * 2
    # 100 rows, steps of at most 16 tokens: 25 global blocks, and a local group holds at most the 5 rows
    # before a step and the step's 16 (21 rows: 6 blocks, one more where they straddle a boundary)
    assert manager.max_blocks_needed(100, 16) == 25 + 2 * 7
    assert manager.max_blocks_needed(8, 16) == 2 * 3


def test_layers_of_one_buffer_share_tensors_and_a_block_costs_one_group():
    config = ModelConfig(architecture="gemma3", vocab_size=64, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                         layer_types=(SLIDING, SLIDING, FULL, SLIDING), sliding_window=WINDOW)
    flat = KVCacheSpec.for_model(config, torch.float32, block_size=BS)
    grouped = KVCacheSpec.for_model(config, torch.float32, block_size=BS, grouped=True)
    assert flat.groups == () and len(grouped.groups) == 4 and grouped.windows == (None, 6, 6, 6)
    assert grouped.bytes_per_block() * 4 == flat.bytes_per_block()
    caches = create_layer_caches(grouped, num_blocks=8)
    assert [c.group for c in caches] == [1, 2, 0, 3]
    assert len({c.key.data_ptr() for c in caches}) == 1  # one buffer: the group width is one layer
    for cache_dtype in ("int8",):
        spec = KVCacheSpec.for_model(config, torch.float32, cache_dtype, BS, grouped=True)
        int8 = create_layer_caches(spec, num_blocks=8)
        assert len({c.key.codes.data_ptr() for c in int8}) == 1 and len({c.value.scales.data_ptr() for c in int8}) == 1

"""The prefix cache under the runtime precision mask: KV computed on a dense path is shared only with
requests whose KV would be the same (no model: exact block ids)."""

from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.request import Request
from ember.sampling_params import SamplingParams

BS = 4
OPS = frozenset({"model.layers.0.mlp.down_proj"})
TOKENS = list(range(100, 113))  # three full blocks and one token


def make_request(request_id: str, ops: frozenset = OPS, dense: bool = False, salt: str | None = None) -> Request:
    request = Request(request_id, TOKENS, SamplingParams(), cache_salt=salt)
    request.precision_ops = ops
    if dense:
        request.dense_from_position = 0
    return request


def admit(manager: KVCacheManager, request: Request) -> int:
    """Admit the request as the scheduler does (prefix lookup, then the rest); returns the hit tokens."""
    block_ids, num_hit = manager.get_computed_blocks(request)
    assert manager.allocate_slots(request, request.num_tokens - num_hit, block_ids)
    request.num_computed_tokens = request.num_tokens
    manager.check_invariants()
    return num_hit


def finish(manager: KVCacheManager, request: Request) -> None:
    manager.free(request)
    manager.check_invariants()


def test_dense_requests_share_kv_only_with_dense_requests_of_the_same_ops():
    manager = KVCacheManager(num_blocks=32, block_size=BS)
    admitted = []
    for request_id, kwargs, expected_hit in [
            ("quantized", {}, 0),
            ("dense", dict(dense=True), 0),  # the quantized KV is not its KV
            ("dense-again", dict(dense=True), 12),
            ("dense-other-ops", dict(dense=True, ops=frozenset({"lm_head"})), 0),
            ("dense-salted", dict(dense=True, salt="alice"), 0),
            ("quantized-again", dict(ops=frozenset()), 12)]:  # the op set does not change quantized KV
        request = make_request(request_id, **kwargs)
        assert admit(manager, request) == expected_hit, request_id
        admitted.append(request)
    assert make_request("x", dense=True).kv_salt == (None, "dense", OPS)
    assert make_request("y", dense=True, ops=frozenset()).kv_salt is None  # no dense op: quantized KV
    for request in admitted:
        finish(manager, request)


def test_a_switched_request_shares_only_the_blocks_before_its_switch():
    manager = KVCacheManager(num_blocks=32, block_size=BS)
    request = make_request("switched")
    assert admit(manager, request) == 0
    request.append_output_token_id(7)  # one output token: the next row computes position 13
    request.num_computed_tokens = 13
    assert request.start_dense_path() and not request.start_dense_path()
    assert (request.dense_from_position, request.precision_switch_token) == (13, 1)
    assert request.num_cacheable_tokens == 13
    for token in (8, 9, 10):  # positions 13..15 dense: block 3 fills but is never registered
        request.append_output_token_id(token)
        assert manager.allocate_slots(request, 1)
        request.num_computed_tokens += 1
    manager.check_invariants()
    follower = Request("follower", request.all_token_ids, SamplingParams())
    assert manager.get_computed_blocks(follower)[1] == 12  # blocks 0-2 only: their KV is quantized
    finish(manager, request)
    assert manager.get_computed_blocks(follower)[1] == 12


def test_switch_position_of_waiting_and_prefilling_requests():
    waiting = make_request("waiting")
    assert waiting.start_dense_path()
    assert (waiting.dense_from_position, waiting.precision_switch_token, waiting.num_cacheable_tokens) == (0, 0, 0)
    prefilling = make_request("prefilling")
    prefilling.num_computed_tokens = 8  # mid-prompt (chunked prefill)
    prefilling.start_dense_path()
    assert prefilling.dense_from_position == 8
    preempted = make_request("preempted")
    for token in (1, 2, 3):
        preempted.append_output_token_id(token)
    preempted.num_computed_tokens = 0  # its blocks were freed: the switch position is still the next token's
    preempted.start_dense_path()
    assert (preempted.dense_from_position, preempted.precision_switch_token) == (len(TOKENS) + 2, 3)

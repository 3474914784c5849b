"""Drafts in the scheduler and the KV cache (no model): the budget, a full cache, rejected rows' blocks,
and when a request pauses speculation."""

from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.request import Request
from ember.sampling_params import SamplingParams
from ember.scheduler.scheduler import Scheduler
from ember.spec_decode.config import SpeculativeConfig
from ember.spec_decode.speculator import SpecPause, Speculator


def decoding_request(request_id, manager, num_prompt=6, first_token=100, max_tokens=20):
    """A request whose prompt is computed and which has one output token to decode from."""
    request = Request(request_id, list(range(first_token, first_token + num_prompt)), SamplingParams(max_tokens=max_tokens))
    assert manager.allocate_slots(request, num_prompt)
    request.num_computed_tokens = num_prompt
    request.append_output_token_id(7)
    return request


def running(scheduler, *requests):
    for request in requests:
        scheduler.requests[request.request_id] = request
        scheduler.running.append(request)


def test_drafts_count_in_the_budget_and_are_consumed():
    manager = KVCacheManager(16, 4, enable_prefix_caching=False)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=7)
    a, b = decoding_request("a", manager), decoding_request("b", manager, first_token=200)
    running(scheduler, a, b)
    a.spec_token_ids, b.spec_token_ids = [1, 2, 3, 4], [5, 6, 7, 8]
    out = scheduler.schedule()
    # a takes 1 + 4; b gets what is left of 7: its own token and one draft.
    assert [(e.request.request_id, e.num_new_tokens, e.spec_token_ids) for e in out.scheduled] == \
           [("a", 5, [1, 2, 3, 4]), ("b", 2, [5])]
    assert a.spec_token_ids == [] and b.spec_token_ids == []
    assert len(out.scheduled[0].block_ids) == 3  # 7 known tokens + 4 drafts = 11 slots
    scheduler.check_invariants()


def test_a_full_cache_drops_drafts_before_preempting():
    manager = KVCacheManager(4, 4, enable_prefix_caching=False)
    scheduler = Scheduler(manager, max_num_seqs=4, max_num_batched_tokens=64)
    a = decoding_request("a", manager, num_prompt=7)  # 2 blocks, 8 known tokens
    b = decoding_request("b", manager, num_prompt=7, first_token=200)  # 2 blocks: the cache is full
    running(scheduler, a, b)
    a.spec_token_ids = [1, 2, 3]
    out = scheduler.schedule()
    assert not out.preempted
    assert [(e.num_new_tokens, e.spec_token_ids) for e in out.scheduled] == [(1, []), (1, [])]


def test_rejected_drafts_blocks_are_freed():
    manager = KVCacheManager(16, 4, enable_prefix_caching=True)
    request = decoding_request("a", manager, num_prompt=6)  # 7 tokens known
    assert manager.allocate_slots(request, 1 + 4)  # last token + 4 drafts: 11 slots, 3 blocks
    request.num_computed_tokens += 5
    request.num_computed_tokens -= 3  # one draft accepted
    manager.truncate(request, request.num_kv_tokens)
    assert len(manager.get_block_ids("a")) == 2  # 8 rows kept
    manager.check_invariants()


def test_pause_after_a_poor_window_doubles_and_resets():
    pause = SpecPause(window=8, min_rate=0.25)
    pause.record(4, 0, num_output_tokens=5)
    assert not pause.is_paused(5)
    pause.record(4, 1, num_output_tokens=7)  # 1 of 8 accepted: paused for 16 tokens
    assert pause.is_paused(7) and pause.is_paused(22) and not pause.is_paused(23)
    pause.record(8, 0, num_output_tokens=24)  # poor again: 32 tokens this time
    assert pause.is_paused(55) and not pause.is_paused(56)
    pause.record(8, 6, num_output_tokens=60)  # a good window: the next pause is 16 again
    pause.record(8, 0, num_output_tokens=70)
    assert pause.is_paused(85) and not pause.is_paused(86)


def test_speculator_caps_drafts_by_max_tokens_and_model_length():
    config = SpeculativeConfig(method="ngram", num_speculative_tokens=4)
    repeated = list(range(10, 14)) * 3  # prompt lookup always finds the next tokens
    near_end = Request("a", repeated, SamplingParams(max_tokens=3))
    near_end.num_computed_tokens = len(repeated)
    near_end.append_output_token_id(10)  # 1 of 3 output tokens: room for 1 draft + the target's token
    Speculator(config, None, max_model_len=100).propose([near_end])
    assert near_end.spec_token_ids == [11]
    long_ctx = Request("b", repeated, SamplingParams(max_tokens=50))
    long_ctx.num_computed_tokens = len(repeated)
    long_ctx.append_output_token_id(10)
    Speculator(config, None, max_model_len=len(repeated) + 4).propose([long_ctx])
    assert long_ctx.spec_token_ids == [11, 12]  # 13 tokens + 2 drafts + the target's token = 16

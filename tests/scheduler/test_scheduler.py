"""Scheduler decisions with exact block ids; no model involved."""

import pytest

from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.request import Request, RequestStatus
from ember.sampling_params import SamplingParams
from ember.scheduler.scheduler import Scheduler


def make_scheduler(num_blocks=8, block_size=4, max_num_seqs=4, budget=16, caching=False, reserve=1):
    manager = KVCacheManager(num_blocks, block_size, enable_prefix_caching=caching)
    return Scheduler(manager, max_num_seqs=max_num_seqs, max_num_batched_tokens=budget,
                     reserve_blocks_per_seq=reserve)


def request(request_id, num_prompt, first_token=100, max_tokens=8):
    ids = list(range(first_token, first_token + num_prompt))
    return Request(request_id, ids, SamplingParams(max_tokens=max_tokens))


def run_step(scheduler, token=7):
    """Pretend the model ran: advance progress and sample one token where a chunk reached the end."""
    out = scheduler.schedule()
    scheduler.check_invariants()
    for entry in out.scheduled:
        req = entry.request
        req.num_computed_tokens += entry.num_new_tokens
        if req.num_computed_tokens == req.num_tokens:
            req.append_output_token_id(token)
    return out


def plan(out):
    return [(e.request.request_id, e.num_new_tokens, e.block_ids) for e in out.scheduled]


def test_chunked_prefill_mixes_with_decode_under_the_token_budget():
    sched = make_scheduler(num_blocks=16, budget=10)
    sched.add_request(request("a", 6))
    sched.add_request(request("b", 12, first_token=200))
    # Step 1: a's whole prompt (6) + the first 4 tokens of b's prompt.
    assert plan(run_step(sched)) == [("a", 6, [0, 1]), ("b", 4, [2])]
    # Step 2: a decodes 1 token, b gets the rest of the budget (9 of its remaining 8 -> 8).
    assert plan(run_step(sched)) == [("a", 1, [0, 1]), ("b", 8, [2, 3, 4])]
    # Step 3: both decode; b's position 12 opens its fourth block.
    assert plan(run_step(sched)) == [("a", 1, [0, 1]), ("b", 1, [2, 3, 4, 5])]


def test_fcfs_and_max_num_seqs():
    sched = make_scheduler(num_blocks=16, max_num_seqs=2, budget=64)
    for name in "abc":
        sched.add_request(request(name, 3))
    out = run_step(sched)
    assert [e.request.request_id for e in out.scheduled] == ["a", "b"]
    assert [r.request_id for r in sched.waiting] == ["c"]
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    sched.check_invariants()
    out = run_step(sched)
    assert [e.request.request_id for e in out.scheduled] == ["b", "c"]


def test_preempts_most_recent_and_requeues_it_at_the_head():
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64, reserve=0)  # admission may fill the cache
    sched.add_request(request("a", 4))  # fills block 0; decode needs block 1
    sched.add_request(request("b", 8, first_token=300))  # blocks 1, 2 -> then needs a 4th
    sched.add_request(request("c", 3, first_token=400))  # block 3
    assert plan(run_step(sched)) == [("a", 4, [0]), ("b", 8, [1, 2]), ("c", 3, [3])]
    # a's decode needs a new block; none free -> c (admitted last) is preempted and a takes
    # its block 3. b then needs one too: it is now the last running request, so it goes.
    out = run_step(sched)
    assert [r.request_id for r in out.preempted] == ["c", "b"]
    assert plan(out) == [("a", 1, [0, 3])]
    assert all(r.status is RequestStatus.PREEMPTED and r.num_computed_tokens == 0 for r in out.preempted)
    assert [r.request_id for r in sched.waiting] == ["b", "c"]  # older request back at the head
    assert sched.kv_cache_manager.get_block_ids("c") == []
    # Once a finishes, b resumes by recomputing prompt + its sampled token.
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert plan(run_step(sched)) == [("b", 9, [0, 1, 2]), ("c", 4, [3])]


def test_request_preempting_itself_when_it_is_last():
    sched = make_scheduler(num_blocks=2, block_size=4, budget=64, reserve=0)
    sched.add_request(request("a", 4))
    sched.add_request(request("b", 4, first_token=300))
    run_step(sched)  # a -> block 0, b -> block 1
    out = run_step(sched)  # a needs block 2: preempt b; b would need one too
    assert [r.request_id for r in out.preempted] == ["b"]
    assert plan(out) == [("a", 1, [0, 1])]


@pytest.mark.parametrize("reserve", [0, 1])
def test_admission_leaves_a_block_per_running_request_so_the_newest_is_not_preempted(reserve):
    """Three 4-token prompts, 4 blocks of 4, each request 4 new tokens (2 blocks at its end). Filling the
    cache at admission, the next step's growth preempts the newest request, whose prompt was computed for
    nothing; keeping a block per running request free, it waits instead and nothing is computed twice."""
    sched = make_scheduler(num_blocks=4, block_size=4, budget=64, reserve=reserve)
    for i, name in enumerate("abc"):
        sched.add_request(request(name, 4, first_token=100 * (i + 1), max_tokens=4))
    steps, computed = [], 0
    while sched.has_unfinished_requests():
        out = run_step(sched)
        steps.append([e.request.request_id for e in out.scheduled])
        computed += sum(e.num_new_tokens for e in out.scheduled)
        done = [r.request_id for r in sched.running if r.num_output_tokens == r.sampling_params.max_tokens]
        sched.finish_requests(done, RequestStatus.FINISHED_LENGTH)
    if reserve == 0:
        assert steps[0] == ["a", "b", "c"] and sched.num_preemptions_total > 0 and computed > 3 * 7
    else:  # c waits for a block per running request; each prompt is computed once, then 3 decodes
        assert steps[0] == ["a", "b"] and sched.num_preemptions_total == 0 and computed == 3 * 7


def test_finish_and_abort_free_blocks():
    sched = make_scheduler(num_blocks=8)
    sched.add_request(request("a", 5))
    sched.add_request(request("b", 5, first_token=300))
    run_step(sched)
    sched.finish_requests(["a", "b", "unknown"], RequestStatus.FINISHED_ABORTED)
    sched.check_invariants()
    assert sched.kv_cache_manager.num_free_blocks == 8
    assert not sched.has_unfinished_requests()


def test_waiting_request_aborted_before_admission():
    sched = make_scheduler(num_blocks=2, max_num_seqs=1)
    sched.add_request(request("a", 3))
    sched.add_request(request("b", 3))
    run_step(sched)
    sched.finish_requests(["b"], RequestStatus.FINISHED_ABORTED)
    sched.check_invariants()
    assert [r.request_id for r in sched.waiting] == []


@pytest.mark.parametrize("caching", [False, True])
def test_random_workload_terminates_with_every_request(caching):
    """Demand far above the pool: everything finishes through preemption, no deadlock."""
    import random

    rng = random.Random(0)
    sched = make_scheduler(num_blocks=12, block_size=4, max_num_seqs=5, budget=12, caching=caching)
    requests = [request(f"r{i}", rng.randint(1, 20), first_token=rng.choice([100, 500]),
                        max_tokens=rng.randint(1, 20)) for i in range(30)]
    for req in requests:
        sched.add_request(req)
    for _ in range(2000):
        if not sched.has_unfinished_requests():
            break
        run_step(sched)
        done = [r.request_id for r in sched.running if r.num_output_tokens >= r.sampling_params.max_tokens]
        sched.finish_requests(done, RequestStatus.FINISHED_LENGTH)
        sched.check_invariants()
    assert not sched.has_unfinished_requests()
    assert all(r.num_output_tokens == r.sampling_params.max_tokens for r in requests)
    assert sched.kv_cache_manager.usage == 0.0

"""Continuous batching: which requests run this step, with how many tokens each (FCFS)."""

from __future__ import annotations

from collections import deque
from typing import Iterable

from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.request import Request, RequestStatus
from ember.scheduler.output import ScheduledRequest, SchedulerOutput


class Scheduler:
    """Hands out a per-step token budget; owns the waiting queue and the running list.

    There are no prefill/decode phases: each running request asks for
    `num_tokens - num_computed_tokens` tokens (1 when decoding, a chunk of its prompt when
    prefilling), capped by what is left of `max_num_batched_tokens`. When the KV cache is full
    the most recently admitted running request is preempted by recompute: its blocks are
    freed and it goes back to the head of the waiting queue.

    A waiting request is admitted only while `reserve_blocks_per_seq` blocks per running request stay
    free after its allocation. A decoding request takes a new block every `block_size` tokens; a prompt
    admitted into the last free blocks is the most recent request, so the next such growth preempts it
    and its prompt was computed for nothing, again and again while the cache stays full.

    With speculative decoding a decoding request also asks for its draft tokens (`spec_token_ids`),
    which count in the budget; when the cache cannot hold them they are dropped before anyone is
    preempted.
    """

    def __init__(self, kv_cache_manager: KVCacheManager, max_num_seqs: int,
                 max_num_batched_tokens: int, long_prefill_token_threshold: int | None = None,
                 reserve_blocks_per_seq: int = 1) -> None:
        """`long_prefill_token_threshold` (vLLM's name) caps the tokens one request computes in a step;
        `reserve_blocks_per_seq` 0 admits into every free block (as vLLM's V1 scheduler)."""
        self.kv_cache_manager = kv_cache_manager
        self.reserve_blocks_per_seq = reserve_blocks_per_seq
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.long_prefill_token_threshold = long_prefill_token_threshold or max_num_batched_tokens
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}
        self.num_preemptions_total = 0

    def add_request(self, request: Request) -> None:
        self.waiting.append(request)
        self.requests[request.request_id] = request

    def has_unfinished_requests(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        budget = self._schedule_running(out, budget)
        if not out.preempted:  # after a preemption the cache is full: admit nobody new
            self._schedule_waiting(out, budget)
        return out

    def _schedule_running(self, out: SchedulerOutput, budget: int) -> int:
        manager = self.kv_cache_manager
        index = 0
        while index < len(self.running) and budget > 0:
            request = self.running[index]
            num_new = min(request.num_tokens - request.num_computed_tokens, budget, self.long_prefill_token_threshold)
            spec = self._take_spec_tokens(request, budget)
            while not manager.allocate_slots(request, num_new + len(spec)):
                if spec:  # a full cache drops the drafts before it preempts anyone
                    spec = []
                    continue
                victim = self.running.pop()  # most recently admitted
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is request:
                    return budget
            out.scheduled.append(ScheduledRequest(request, num_new + len(spec), manager.get_block_ids(request.request_id),
                                                  spec, manager.get_group_block_ids(request.request_id)))
            budget -= num_new + len(spec)
            index += 1
        return budget

    def _take_spec_tokens(self, request: Request, budget: int) -> list[int]:
        """The drafts a decoding request verifies this step, as many as the step's budget leaves room for;
        its proposal is consumed either way (the engine proposes afresh after every step)."""
        spec, request.spec_token_ids = request.spec_token_ids, []
        if not spec or request.num_tokens - request.num_computed_tokens != 1:
            return []
        return spec[:max(0, min(budget, self.long_prefill_token_threshold) - 1)]

    def _schedule_waiting(self, out: SchedulerOutput, budget: int) -> None:
        manager = self.kv_cache_manager
        index = 0  # requests still compiling their grammar are passed over, in place
        while index < len(self.waiting) and budget > 0 and len(self.running) < self.max_num_seqs:
            request = self.waiting[index]
            if not request.is_schedulable:
                index += 1
                continue
            cached_blocks, num_cached = manager.get_computed_blocks(request)
            num_new = min(request.num_tokens - num_cached, budget, self.long_prefill_token_threshold)
            reserve = self.reserve_blocks_per_seq * len(self.running)
            if not manager.allocate_slots(request, num_new, cached_blocks, num_reserved_blocks=reserve):
                break  # FCFS: nobody jumps the head of the queue
            del self.waiting[index]
            if request.status is RequestStatus.WAITING:  # first admission, not a resume
                request.num_cached_tokens = num_cached
            request.num_computed_tokens = num_cached
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            out.scheduled.append(ScheduledRequest(request, num_new, manager.get_block_ids(request.request_id),
                                                  group_block_ids=manager.get_group_block_ids(request.request_id)))
            budget -= num_new

    def _preempt(self, request: Request) -> None:
        self.kv_cache_manager.free(request)
        request.spec_token_ids = []
        request.num_computed_tokens = 0
        request.num_evicted_tokens = 0
        request.status = RequestStatus.PREEMPTED
        request.num_preemptions += 1
        self.num_preemptions_total += 1
        self.waiting.appendleft(request)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests (finished or aborted): free their blocks at once. Unknown ids are ignored."""
        finished = []
        for request_id in request_ids:
            request = self.requests.pop(request_id, None)
            if request is None:
                continue
            if request in self.running:  # its status may already say why it finished
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            self.kv_cache_manager.free(request)
            request.status = status
            finished.append(request)
        return finished

    def check_invariants(self) -> None:
        """Every known request is in exactly one of waiting/running; the cache agrees."""
        running_ids = [r.request_id for r in self.running]
        waiting_ids = [r.request_id for r in self.waiting]
        assert len(set(running_ids)) == len(running_ids), "duplicate running request"
        assert not set(running_ids) & set(waiting_ids), "request both running and waiting"
        assert set(running_ids) | set(waiting_ids) == set(self.requests), "lost or leaked request"
        assert len(self.running) <= self.max_num_seqs, "too many running requests"
        for request in self.waiting:
            assert not self.kv_cache_manager.get_block_ids(request.request_id), \
                f"waiting {request.request_id} holds blocks"
        self.kv_cache_manager.check_invariants()

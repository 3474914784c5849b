"""Keeps each request of an engine run with --kv-eviction within its KV budget: after every step, a
request holding more rows than the budget has its kept rows compacted to the front of its block table
and the blocks past them returned to the allocator."""

from __future__ import annotations

from ember.attention.eviction import EvictionConfig, EvictionState, compact_caches
from ember.engine.model_runner import ModelRunner, ModelRunnerOutput
from ember.kv_cache.kv_cache_manager import KVCacheManager
from ember.scheduler.output import SchedulerOutput


class EvictionManager:
    """Per-request eviction state (attention statistics) and the compaction after each step."""

    def __init__(self, config: EvictionConfig, kv_cache_manager: KVCacheManager, runner: ModelRunner) -> None:
        self.config = config
        self.kv_cache_manager = kv_cache_manager
        self.runner = runner
        runner.record_attention = config.needs_attention
        self._states: dict[str, EvictionState] = {}
        self.num_evicted_total = 0  # KV rows dropped since start

    def after_step(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput) -> None:
        """Update the step's requests' statistics and compact those over budget. Call after the
        requests' `num_computed_tokens` count the step's tokens."""
        for request in scheduler_output.preempted:  # recompute starts over, statistics too
            self._states.pop(request.request_id, None)
        mass = {id(r): m for r, m in runner_output.attention_mass or ()}
        for entry in scheduler_output.scheduled:
            request = entry.request
            if request.is_finished:
                self._states.pop(request.request_id, None)
                continue
            state = self._states.setdefault(request.request_id, EvictionState(self.config))
            if id(request) in mass:
                state.observe(mass[id(request)])
            num_rows = request.num_kv_tokens
            kept = state.select(num_rows)
            if kept is None:
                continue
            table = self.kv_cache_manager.get_block_ids(request.request_id)
            compact_caches(self.runner.kv_caches, table, kept, num_rows)
            self.kv_cache_manager.truncate(request, len(kept))
            request.num_evicted_tokens += num_rows - len(kept)
            self.num_evicted_total += num_rows - len(kept)
            state.compact(kept)

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)


def max_rows_needed(config: EvictionConfig | None, num_tokens: int, max_chunk: int) -> int:
    """KV rows a request of `num_tokens` tokens can hold at once: all of them without eviction, else
    the budget plus one step's tokens."""
    if config is None:
        return num_tokens
    return min(num_tokens, config.budget_tokens + max_chunk)

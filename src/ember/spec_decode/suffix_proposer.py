"""Suffix decoding: drafts from suffix trees over the request's own tokens and earlier requests' outputs.

The trees are arctic-inference's (`SuffixDecodingCache`, the library vLLM's "suffix" method uses): one per
running request over its prompt and output, and one global tree over the outputs of the last
`max_cached_requests` finished requests. A draft is the most likely continuation of the longest suffix of
the request's last `max_tree_depth` tokens found in either tree; its length adapts to how long that match is
(`max_spec_factor`) and how sure the tree is (`min_token_prob`), so repetitive text gets long drafts and new
text none.
"""

from __future__ import annotations

from ember.request import Request


def _suffix_cache_class():
    try:
        from arctic_inference.suffix_decoding import SuffixDecodingCache
    except ImportError:
        raise ImportError('speculative_config method "suffix" needs arctic-inference: '
                          'pip install "arctic-inference==0.3.0" (or ember[suffix])') from None
    return SuffixDecodingCache


class SuffixProposer:
    """Keeps each running request's tree up to date and proposes drafts for the requests that ask.

    Args:
        max_tree_depth: the longest suffix matched, and the depth of every tree.
        max_cached_requests: finished requests whose outputs the global tree keeps (0: none).
        max_spec_factor: a draft is at most this many times the matched suffix's length.
        min_token_prob: a draft stops at the first token the tree gives less than this probability.
    """

    def __init__(self, max_tree_depth: int, max_cached_requests: int, max_spec_factor: float,
                 min_token_prob: float) -> None:
        self.cache = _suffix_cache_class()(max_tree_depth=max_tree_depth, max_cached_requests=max_cached_requests)
        self.max_tree_depth = max_tree_depth
        self.max_spec_factor = max_spec_factor
        self.min_token_prob = min_token_prob
        self._num_outputs: dict[str, int] = {}  # the active trees: output tokens already in each

    def propose(self, running: list[Request], requests: list[Request], budgets: list[int]) -> list[list[int]]:
        """Up to `budgets[i]` draft tokens for each of `requests` (a subset of `running`). Every running
        request's new output tokens join its tree first; a request no longer running is stopped, which
        moves its output into the global tree."""
        live = {request.request_id for request in running}
        for request_id in [r for r in self._num_outputs if r not in live]:
            self.release(request_id)
        for request in running:
            self._observe(request)
        drafts = []
        for request, budget in zip(requests, budgets):
            context = request.all_token_ids[-self.max_tree_depth:]
            draft = self.cache.speculate(request.request_id, context, max_spec_tokens=budget,
                                         max_spec_factor=self.max_spec_factor, min_token_prob=self.min_token_prob)
            drafts.append(list(draft.token_ids))
        return drafts

    def _observe(self, request: Request) -> None:
        request_id, outputs = request.request_id, request.output_token_ids
        seen = self._num_outputs.get(request_id)
        if seen is None:  # new, or back after a preemption
            if request_id in self.cache.cached_requests:  # its earlier output (or a reused id's)
                self.cache.evict_cached_response(request_id)
            self.cache.start_request(request_id, request.prompt_token_ids)
            seen = 0
        if len(outputs) > seen:
            self.cache.add_active_response(request_id, outputs[seen:])
        self._num_outputs[request_id] = len(outputs)

    def release(self, request_id: str) -> None:
        """Stop a request's tree: its output joins the global tree (the oldest leave past the limit)."""
        if self._num_outputs.pop(request_id, None) is not None:
            self.cache.stop_request(request_id)

    def reset(self) -> None:
        """After a failed proposal: stop every tree; each running request starts a fresh one next step."""
        for request_id in list(self._num_outputs):
            self.release(request_id)

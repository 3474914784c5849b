"""Prompt lookup: propose the tokens that followed the sequence's latest n-gram where it occurred before."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    """Matches the last n tokens (n from `max_n` down to `min_n`) against the rest of the sequence.

    The first earlier occurrence of the longest matching suffix wins (as vLLM's ngram proposer), and the
    up to k tokens that followed it are the draft. Costs one vectorized scan per n; no model runs.
    """

    def __init__(self, min_n: int, max_n: int) -> None:
        self.min_n = min_n
        self.max_n = max_n

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        """Up to `k` draft tokens to follow `token_ids` ([] when no suffix occurred before)."""
        num_tokens = len(token_ids)
        if k < 1 or num_tokens <= self.min_n:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.max_n, num_tokens - 1), self.min_n - 1, -1):
            # Windows that start early enough to be followed by at least one token.
            windows = sliding_window_view(tokens[:-1], n)  # [num_tokens - n, n]
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[0]) + n
                return token_ids[start:start + k]
        return []

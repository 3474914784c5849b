"""Which cached tokens a request keeps once its KV cache outgrows a token budget: the first "sink" tokens
and a recent window (StreamingLLM, Xiao et al. 2023), plus heavy hitters by accumulated attention (H2O,
Zhang et al. 2023), or what an observation window of the latest queries attends to, pooled (SnapKV, Li et
al. 2024); and the attention-mass recorder those scores come from.

Positions are kept: a cached key stays rotated at its original position, and a new token's query is
rotated at its true position (`num_computed_tokens`), so relative distances stay exact and evicted
tokens are simply absent, as if masked. Scores are summed over heads and layers, so every layer keeps
the same tokens.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.config import KV_EVICTION_POLICIES

SNAPKV_WINDOW = 32  # SnapKV's observation window: the latest queries whose attention scores the cache
SNAPKV_POOL = 7  # and the width of the average pooling that keeps neighbours of a selected token


@dataclass(frozen=True)
class EvictionConfig:
    """`policy` keeps a request's cache at most `budget_tokens` rows after every step; when it outgrows
    that, it is cut to `budget_tokens - slack` rows at once, so a decoding request is compacted every
    `slack` tokens rather than every token."""

    policy: str
    budget_tokens: int
    sink_tokens: int = 4
    slack: int = 16

    def __post_init__(self) -> None:
        if self.policy not in KV_EVICTION_POLICIES or self.policy == "none":
            raise ValueError(f"eviction policy must be one of {KV_EVICTION_POLICIES[1:]}, got {self.policy!r}")
        if self.sink_tokens < 0 or self.slack < 1:
            raise ValueError(f"need sink_tokens >= 0 and slack >= 1, got {self.sink_tokens}, {self.slack}")
        floor = self.sink_tokens + self.slack + (SNAPKV_WINDOW if self.policy == "snapkv" else 1)
        if self.budget_tokens < floor + self.slack:
            raise ValueError(f"kv_budget_tokens must be at least {floor + self.slack} for {self.policy} "
                             f"(sinks {self.sink_tokens}, slack {self.slack}), got {self.budget_tokens}")

    @property
    def needs_attention(self) -> bool:
        return self.policy in ("h2o", "snapkv")

    @property
    def target(self) -> int:
        """Rows kept after a compaction."""
        return self.budget_tokens - self.slack


class EvictionState:
    """One request's attention statistics, aligned with its cache rows (row i = i-th cached token)."""

    def __init__(self, config: EvictionConfig) -> None:
        self.config = config
        self.mass = torch.zeros(0)  # h2o: attention each row has received, summed
        self.window: deque[torch.Tensor] = deque(maxlen=SNAPKV_WINDOW)  # snapkv: the latest queries' rows

    def observe(self, mass: torch.Tensor) -> None:
        """Add one step's attention: mass [n_queries, num_rows], each query's probabilities over the
        cache rows (zero past its causal end), summed over heads and layers."""
        if self.config.policy == "h2o":
            total = mass.sum(0)
            self.mass = F.pad(self.mass, (0, len(total) - len(self.mass))) + total
        elif self.config.policy == "snapkv":
            self.window.extend(mass)

    def select(self, num_rows: int) -> torch.Tensor | None:
        """The rows to keep (sorted int64) when `num_rows` exceeds the budget, else None."""
        cfg = self.config
        if num_rows <= cfg.budget_tokens:
            return None
        target = cfg.target
        if cfg.policy == "snapkv":
            return self._snapkv(num_rows, target)
        sinks = torch.arange(min(cfg.sink_tokens, target))
        num_recent = target - len(sinks) if cfg.policy == "streaming" else (target - len(sinks)) // 2
        recent = torch.arange(num_rows - num_recent, num_rows)
        num_heavy = target - len(sinks) - num_recent
        if num_heavy == 0:
            return torch.cat([sinks, recent])
        middle = F.pad(self.mass, (0, num_rows - len(self.mass)))[len(sinks):num_rows - num_recent]
        heavy = middle.topk(num_heavy).indices + len(sinks)
        return torch.cat([sinks, heavy.sort().values, recent])

    def _snapkv(self, num_rows: int, target: int) -> torch.Tensor:
        window = min(SNAPKV_WINDOW, num_rows)
        scores = torch.zeros(num_rows)
        for row in self.window:
            scores[:len(row)] += row
        prefix = scores[:num_rows - window]
        pooled = F.avg_pool1d(prefix[None, None], SNAPKV_POOL, stride=1, padding=SNAPKV_POOL // 2,
                              count_include_pad=False)[0, 0]
        picked = pooled.topk(target - window).indices.sort().values
        return torch.cat([picked, torch.arange(num_rows - window, num_rows)])

    def compact(self, kept: torch.Tensor) -> None:
        """Re-align the statistics after rows `kept` became rows 0..len(kept)-1."""
        if self.config.policy == "h2o":
            self.mass = F.pad(self.mass, (0, int(kept[-1]) + 1 - len(self.mass)))[kept]
        elif self.config.policy == "snapkv":
            rows = [row[kept[kept < len(row)]] for row in self.window]
            self.window = deque(rows, maxlen=SNAPKV_WINDOW)


class AttentionMassRecorder:
    """Sums, over heads and layers, each query's attention probabilities over its sequence's cache rows.

    The sequences are the step's in `AttentionMetadata` order (decode rows, then prefill chunks). It
    recomputes the probabilities from the cached keys (the fast kernels do not return them), so it
    costs about one more attention pass; only a policy that scores tokens turns it on.
    """

    def __init__(self, num_queries: list[int], num_rows: list[int]) -> None:
        """num_queries / num_rows: per sequence, its queries this step and its cache rows after them."""
        self.mass = [torch.zeros(n, rows) for n, rows in zip(num_queries, num_rows)]

    def record(self, q: torch.Tensor, cache, meta, scale: float) -> None:
        """q [T, H, D]: the step's queries; `cache` holds this layer's rows (written this step)."""
        spans = []
        if meta.num_decode_tokens:
            spans += [(i, 1, table, int(length)) for i, (table, length) in
                      enumerate(zip(meta.decode_block_tables, meta.decode_seq_lens))]
        spans += [(c.query_start, c.query_len, c.block_table, c.context_len + c.query_len) for c in meta.prefills]
        for mass, (start, n, table, length) in zip(self.mass, spans):
            keys = cache.read(table)[0][:length].float()  # [S, KVH, D]
            queries = q[start:start + n].float()  # [n, H, D]
            keys = keys.repeat_interleave(queries.shape[1] // keys.shape[1], dim=1)
            scores = torch.einsum("qhd,khd->hqk", queries, keys) * scale
            causal = torch.ones(n, length, dtype=torch.bool).tril(length - n)
            mass += scores.masked_fill(~causal, float("-inf")).softmax(-1).sum(0)


def compact_caches(caches: list, block_table: list[int], kept: torch.Tensor, num_rows: int) -> None:
    """Move rows `kept` (sorted) of a sequence's cache to rows 0..len(kept)-1, in every layer; rows
    from len(kept) to num_rows are dropped (their blocks may then be freed)."""
    block_size = caches[0].block_size
    table = torch.tensor(block_table, dtype=torch.int64)
    rows = torch.arange(num_rows)
    slots = table[rows // block_size] * block_size + rows % block_size  # [num_rows] slot of each row
    for cache in caches:
        cache.move(slots[kept], slots[:len(kept)], slots[len(kept):])

"""Perplexity of one long document read through a KV cache under an eviction policy: teacher-forced in
chunks, evicting after each chunk as the engine does after each step."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.attention.eviction import AttentionMassRecorder, EvictionConfig, EvictionState, compact_caches
from ember.attention.layer_cache import create_layer_caches
from ember.attention.metadata import build_attention_metadata
from ember.eval.perplexity import model_cache_spec
from ember.kv_cache.block_allocator import BlockAllocator


@dataclass
class LongContextResult:
    perplexity: float
    num_tokens: int  # tokens scored (all but the first)
    max_rows: int  # most KV rows held at once (during a chunk: the kept rows plus the chunk)
    max_blocks: int  # most blocks allocated at once

    def to_dict(self) -> dict:
        return dict(vars(self))


@torch.inference_mode()
def long_context_perplexity(model, token_ids: list[int], eviction: EvictionConfig | None = None,
                            chunk_size: int = 32, block_size: int = 16) -> LongContextResult:
    """exp(mean NLL) of `token_ids[1:]`, each chunk attending to every kept row before it and to itself.

    Blocks come from a real `BlockAllocator` and go back to it after each compaction, so `max_blocks`
    is what the engine would hold for this request.
    """
    num_tokens = len(token_ids)
    capacity = num_tokens if eviction is None else min(num_tokens, eviction.budget_tokens + chunk_size)
    caches = create_layer_caches(model_cache_spec(model, "auto", block_size), -(-capacity // block_size))
    allocator = BlockAllocator(len(caches[0].key))
    state = EvictionState(eviction) if eviction is not None else None
    table: list[int] = []
    num_rows, nll, max_rows, max_blocks = 0, 0.0, 0, 0
    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        while len(table) * block_size < num_rows + end - start:
            table.append(allocator.allocate())
        max_rows, max_blocks = max(max_rows, num_rows + end - start), max(max_blocks, allocator.num_allocated)
        meta = build_attention_metadata([table], [num_rows], [end - start], block_size)
        if state is not None and eviction.needs_attention:
            meta.attention_mass = AttentionMassRecorder([end - start], [num_rows + end - start])
        hidden = model(torch.tensor(token_ids[start:end]), torch.arange(start, end), caches, meta)
        targets = torch.tensor(token_ids[start + 1:end + 1])  # row i predicts token start + i + 1
        nll += F.cross_entropy(model.compute_logits(hidden)[:len(targets)], targets, reduction="sum").item()
        num_rows += end - start
        if state is None:
            continue
        if meta.attention_mass is not None:
            state.observe(meta.attention_mass.mass[0])
        kept = state.select(num_rows)
        if kept is not None:
            compact_caches(caches, table, kept, num_rows)
            num_rows = len(kept)
            while len(table) > -(-num_rows // block_size):
                allocator.free(table.pop())
            state.compact(kept)
    return LongContextResult(math.exp(nll / (num_tokens - 1)), num_tokens - 1, max_rows, max_blocks)

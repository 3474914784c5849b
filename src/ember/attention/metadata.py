"""Per-step description of where each token's keys/values live in the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class PrefillChunk:
    """A run of `query_len` consecutive tokens of one sequence, starting at `context_len`."""

    query_start: int  # offset of the chunk's first token in the step's flat batch
    query_len: int
    context_len: int  # tokens of this sequence already in the cache before this chunk
    block_table: torch.Tensor  # [num_blocks_of_seq] int64
    # [query_len, context_len + query_len] bool (True = may attend); None for a fresh causal prefill
    mask: torch.Tensor | None


@dataclass
class AttentionMetadata:
    """Built once per step by the model runner and shared by every layer.

    The step's tokens are ordered decode tokens first (one per decoding sequence), then prefill
    chunks. Every new token's K/V is written at `slot_mapping` before any attention reads.
    """

    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset
    num_decode_tokens: int
    decode_block_tables: torch.Tensor | None  # [num_decode, max_blocks] int64
    decode_seq_lens: torch.Tensor | None  # [num_decode] int64, the new token included
    prefills: list[PrefillChunk]
    # [num_decode, 1, 1, max_blocks * block_size] bool; only the PyTorch reference path reads it
    decode_mask: torch.Tensor | None = None

"""Per-step description of where each token's keys/values live in the paged KV cache."""

from __future__ import annotations

from dataclasses import dataclass, field

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
    # An `eviction.AttentionMassRecorder` every layer feeds, when the eviction policy scores tokens.
    attention_mass: object | None = None
    # (window, prefill index or -1 for the decode rows) -> (first block read, mask over the rows from there),
    # or None for decode rows the window cuts nothing of: made by the step's first sliding-window layer
    window_masks: dict = field(default_factory=dict)
    # With KV-cache groups (`kv_cache.groups`): group g's metadata, this one first; a layer reads its group's
    # slots and block tables. Empty: every layer reads this one.
    groups: list["AttentionMetadata"] = field(default_factory=list)

    def for_group(self, group: int) -> "AttentionMetadata":
        return self.groups[group] if self.groups else self


def with_group_tables(meta: AttentionMetadata, group_tables: list[list[list[int | None]]], query_lens: list[int],
                      block_size: int, positions: torch.Tensor) -> AttentionMetadata:
    """`meta` (group 0's) with the other groups' metadata attached: `group_tables[g - 1]` holds each sequence's
    block table in group g, None where a local group let go of a block (no query reads it: only the rows of
    its window are, and the decode path masks what a batch's widest gather takes in). A group differs only in
    its tables and slots; lengths, chunks and the cache of window masks (which depend on lengths alone) are
    group 0's. `positions`: every new token's cache row (groups never run with KV eviction, so its position).
    """
    row_of_token = torch.repeat_interleave(torch.arange(len(query_lens)), torch.tensor(query_lens))
    block_index, offset = positions // block_size, positions % block_size
    num_decode = meta.num_decode_tokens
    meta.groups = [meta]
    for tables in group_tables:
        padded = _pad_tables([[0 if b is None else b for b in t] for t in tables])
        chunks = [PrefillChunk(c.query_start, c.query_len, c.context_len, padded[row, :len(tables[row])], c.mask)
                  for row, c in enumerate(meta.prefills, start=num_decode)]
        meta.groups.append(AttentionMetadata(padded[row_of_token, block_index] * block_size + offset, num_decode,
                                             padded[:num_decode] if num_decode else None, meta.decode_seq_lens,
                                             chunks, window_masks=meta.window_masks))
    return meta


def build_attention_metadata(block_tables: list[list[int]], context_lens: list[int],
                             query_lens: list[int], block_size: int,
                             positions: torch.Tensor | None = None) -> AttentionMetadata:
    """The one way a step's `AttentionMetadata` is made, from plain per-sequence data.

    The step's tokens are laid out sequence after sequence, `query_lens[i]` tokens of sequence i
    at positions `context_lens[i]` onward. The leading run of sequences with one new token are
    the decode rows, batched together (the runner sorts them first); every later sequence is a
    prefill chunk.

    Args:
        block_tables: each sequence's block ids, covering at least its context and new tokens.
        context_lens: tokens of each sequence whose K/V is already in the cache.
        query_lens: new tokens of each sequence this step (>= 1).
        block_size: tokens per KV-cache block.
        positions: [num_tokens] int64 absolute position of every new token, when the caller
            already built it for the model; otherwise derived from the lengths.
    Returns:
        The metadata with slot mapping, decode rows, prefill chunks and their causal masks.
    Raises:
        ValueError: the three lists differ in length or are empty.
    """
    num_seqs = len(block_tables)
    if num_seqs == 0 or not num_seqs == len(context_lens) == len(query_lens):
        raise ValueError(f"need one block table, context length and query length per sequence, got "
                         f"{num_seqs}, {len(context_lens)}, {len(query_lens)}")
    tables = _pad_tables(block_tables)  # [num_seqs, max_blocks]; every row below indexes it
    counts = torch.tensor(query_lens, dtype=torch.int64)
    row_of_token = torch.repeat_interleave(torch.arange(num_seqs), counts)  # [num_tokens]
    if positions is None:
        positions = _token_positions(context_lens, counts, row_of_token)
    slot_mapping = tables[row_of_token, positions // block_size] * block_size + positions % block_size
    num_decode = next((i for i, n in enumerate(query_lens) if n != 1), num_seqs)
    decode_seq_lens = (torch.tensor(context_lens[:num_decode], dtype=torch.int64) + 1) if num_decode else None
    return AttentionMetadata(slot_mapping, num_decode, tables[:num_decode] if num_decode else None,
                             decode_seq_lens, _prefill_chunks(tables, block_tables, context_lens,
                                                              query_lens, num_decode))


def _token_positions(context_lens: list[int], counts: torch.Tensor,
                     row_of_token: torch.Tensor) -> torch.Tensor:
    """[num_tokens] int64: token j of sequence i sits at context_lens[i] + j."""
    first_token = torch.cumsum(counts, 0) - counts  # [num_seqs] offset of each sequence's first token
    starts = torch.tensor(context_lens, dtype=torch.int64)
    return torch.arange(len(row_of_token)) - first_token[row_of_token] + starts[row_of_token]


def _prefill_chunks(tables: torch.Tensor, block_tables: list[list[int]], context_lens: list[int],
                    query_lens: list[int], num_decode: int) -> list[PrefillChunk]:
    """One chunk per sequence after the decode rows, each with its slice of the padded tables."""
    chunks = []
    offset = num_decode  # decode rows hold one token each
    for row in range(num_decode, len(query_lens)):
        ctx, num_new = context_lens[row], query_lens[row]
        chunks.append(PrefillChunk(offset, num_new, ctx, tables[row, :len(block_tables[row])],
                                   _chunk_mask(ctx, num_new)))
        offset += num_new
    return chunks


def _chunk_mask(context_len: int, query_len: int) -> torch.Tensor | None:
    """Query i (absolute position context_len + i) sees keys 0..context_len + i."""
    if context_len == 0:
        return None
    return torch.ones(query_len, context_len + query_len, dtype=torch.bool).tril(context_len)


def sliding_window_mask(context_len: int, query_len: int, window: int, first_row: int = 0) -> torch.Tensor:
    """[query_len, context_len + query_len - first_row] bool over rows first_row..: query i (position
    context_len + i) sees the rows at or before it and after position - window (Hugging Face's window)."""
    rows = torch.arange(first_row, context_len + query_len)
    positions = torch.arange(context_len, context_len + query_len)[:, None]
    return (rows <= positions) & (rows > positions - window)


def _pad_tables(tables: list[list[int]]) -> torch.Tensor:
    """Block tables as one [N, max_blocks] int64 tensor, rows padded with block 0."""
    width = max(len(t) for t in tables)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int64)

"""Attention over the paged KV cache for a mixed batch of decode tokens and prefill chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.attention.metadata import AttentionMetadata, sliding_window_mask
from ember.attention.layer_cache import LayerCache


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                    meta: AttentionMetadata, scale: float, sliding_window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Causal attention of the step's queries over every cached token of their sequence.

    Args:
        q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] for the step's new tokens.
        cache: the layer's KV cache; the new K/V are written (quantized, for an int8 cache) first.
        sliding_window: a query sees only its `sliding_window` latest rows, its own included (a local
            layer); only the blocks holding them are read. None: every row.
        softcap: scores become softcap * tanh(scores / softcap) before the softmax (None: uncapped).
    Returns:
        [T, num_heads, head_dim]
    """
    meta = meta.for_group(cache.group)
    cache.write(k, v, meta.slot_mapping)
    parts = []
    if meta.num_decode_tokens:
        parts.append(_decode_attention(q[:meta.num_decode_tokens], cache, meta, scale, sliding_window, softcap))
    for index in range(len(meta.prefills)):
        parts.append(_prefill_attention(q, k, v, cache, meta, index, scale, sliding_window, softcap))
    if meta.attention_mass is not None:
        meta.attention_mass.record(q, cache, meta, scale)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _prefill_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                       meta: AttentionMetadata, index: int, scale: float, window: int | None,
                       softcap: float | None) -> torch.Tensor:
    """One prompt chunk's queries over its sequence's rows -> [query_len, H, D]."""
    chunk = meta.prefills[index]
    end = chunk.query_start + chunk.query_len
    if window is None and softcap is None:
        out = cache.prefill(q[chunk.query_start:end], chunk.block_table, chunk.context_len, scale)
        if out is not None:  # the native kernel, straight over the chunk's blocks (this step's K/V are written)
            return out
    q_chunk = q[chunk.query_start:end].transpose(0, 1)[None]  # [1, H, n, D]: SDPA's CPU flash kernel wants 4-D
    first_block, mask = (0, chunk.mask) if window is None else _prefill_window(meta, index, window, cache.block_size)
    if chunk.context_len == 0 and not cache.is_quantized:
        keys, values = k[chunk.query_start:end], v[chunk.query_start:end]  # a fresh prompt's rows: this step's k/v
    else:
        # A continued chunk reads its context back; an int8 cache's fresh prompt too, through the codes, so a
        # token attends to the same keys whether its prompt came in one pass, in chunks, cached or recomputed.
        num_rows = chunk.context_len + chunk.query_len - first_block * cache.block_size
        keys, values = (rows[:num_rows] for rows in cache.read(chunk.block_table[first_block:]))
    out = attend(q_chunk, keys.transpose(0, 1)[None], values.transpose(0, 1)[None], mask, scale, softcap)
    return out[0].transpose(0, 1)


def _prefill_window(meta: AttentionMetadata, index: int, window: int,
                    block_size: int) -> tuple[int, torch.Tensor | None]:
    """(first block a windowed chunk reads, its mask over the rows from there), made once per step; a window
    as long as the sequence cuts nothing and keeps the plain causal mask (and SDPA's causal kernel)."""
    key = (window, index)
    if key not in meta.window_masks:
        chunk = meta.prefills[index]
        if chunk.context_len + chunk.query_len <= window:
            meta.window_masks[key] = (0, chunk.mask)
            return meta.window_masks[key]
        first_block = max(chunk.context_len - window + 1, 0) // block_size  # the first query's oldest row
        meta.window_masks[key] = (first_block, sliding_window_mask(chunk.context_len, chunk.query_len, window,
                                                                   first_block * block_size))
    return meta.window_masks[key]


def _decode_attention(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, scale: float,
                      window: int | None, softcap: float | None) -> torch.Tensor:
    cuts = window is not None and _decode_window(meta, window, cache.block_size) is not None
    if not cuts and softcap is None:  # the native kernel can neither window nor cap
        out = cache.decode(q, meta, scale)  # it reads K/V through the block table, no gather
        if out is not None:
            return out
    return decode_attention_reference(q, cache, meta, scale, window, softcap)


def decode_attention_reference(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, scale: float,
                               window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """Gather each sequence's blocks (a windowed layer: from the first one any row's window reaches), then
    masked SDPA. q: [N, H, D] -> [N, H, D]."""
    num_seqs, num_heads, head_dim = q.shape
    view = None if window is None else _decode_window(meta, window, cache.block_size)
    if view is None:
        first_block = 0
        if meta.decode_mask is None:
            width = meta.decode_block_tables.shape[1] * cache.block_size
            meta.decode_mask = (torch.arange(width)[None, :] < meta.decode_seq_lens[:, None])[:, None, None, :]
        mask = meta.decode_mask
    else:
        first_block, mask = view
    keys, values = cache.read(meta.decode_block_tables[:, first_block:])  # [N, S, KVH, D]
    num_kv_heads = keys.shape[2]
    # The query heads sharing one KV head act as that head's queries: [N, KVH, group, D],
    # so grouped-query attention needs no repeated keys.
    q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = attend(q, keys.transpose(1, 2), values.transpose(1, 2), mask, scale, softcap)
    return out.reshape(num_seqs, num_heads, head_dim)


def _decode_window(meta: AttentionMetadata, window: int, block_size: int) -> tuple[int, torch.Tensor] | None:
    """(first block any decode row's window reaches, [N, 1, 1, rows] mask from there), made once per step;
    None when every row's sequence fits in the window (nothing to cut)."""
    key = (window, -1)
    if key not in meta.window_masks:
        seq_lens = meta.decode_seq_lens[:, None]  # [N, 1], the new token included
        if int(seq_lens.max()) <= window:
            meta.window_masks[key] = None
            return None
        first_block = max(int(seq_lens.min()) - window, 0) // block_size
        rows = torch.arange(first_block * block_size, meta.decode_block_tables.shape[1] * block_size)
        mask = (rows < seq_lens) & (rows >= seq_lens - window)
        meta.window_masks[key] = (first_block, mask[:, None, None, :])
    return meta.window_masks[key]


def attend(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor | None, scale: float,
           softcap: float | None = None) -> torch.Tensor:
    """q [B, H, n, D] over keys, values [B, KVH, S, D] (H a multiple of KVH) -> [B, H, n, D].

    `mask` (True: may attend) broadcasts to [B, H, n, S]; None means causal, the queries being the last n
    rows. With `softcap`, the explicit softmax(softcap * tanh(scores / softcap)) (Gemma 2), which SDPA
    cannot express.
    """
    grouped = keys.shape[1] != q.shape[1]
    if softcap is None:
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=mask is None, scale=scale,
                                              enable_gqa=grouped)
    if grouped:
        group = q.shape[1] // keys.shape[1]
        keys, values = keys.repeat_interleave(group, dim=1), values.repeat_interleave(group, dim=1)
    scores = (q @ keys.transpose(-1, -2)).float() * scale  # [B, H, n, S]
    scores = softcap * torch.tanh(scores / softcap)
    if mask is None:
        num_queries, num_rows = scores.shape[-2:]
        mask = torch.ones(num_queries, num_rows, dtype=torch.bool).tril(num_rows - num_queries)
    return scores.masked_fill(~mask, float("-inf")).softmax(-1).to(values.dtype) @ values


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int | None = None,
                    softcap: float | None = None) -> torch.Tensor:
    """Reference causal attention over one whole sequence, in float32 with explicit softmax.

    q: [S, H, D]; k, v: [S, KVH, D] -> [S, H, D]; `window`, `softcap` as in `paged_attention`. Used by tests only.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    offset = k.shape[0] - q.shape[0]  # the queries are the last rows
    allowed = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(offset)
    if window is not None:
        allowed &= ~torch.ones_like(allowed).tril(offset - window)
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)

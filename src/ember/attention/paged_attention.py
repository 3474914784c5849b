"""Attention over the paged KV cache for a mixed batch of decode tokens and prefill chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.attention.metadata import AttentionMetadata
from ember.attention.layer_cache import LayerCache


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache,
                    meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the step's queries over every cached token of their sequence.

    Args:
        q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] for the step's new tokens.
        cache: the layer's KV cache; the new K/V are written (quantized, for an int8 cache) first.
    Returns:
        [T, num_heads, head_dim]
    """
    cache.write(k, v, meta.slot_mapping)
    parts = []
    if meta.num_decode_tokens:
        parts.append(_decode_attention(q[:meta.num_decode_tokens], cache, meta, scale))
    for chunk in meta.prefills:
        end = chunk.query_start + chunk.query_len
        q_chunk = q[chunk.query_start:end].transpose(0, 1)[None]  # [1, H, n, D]: SDPA's CPU flash
        if chunk.context_len == 0:                                 # kernel wants 4-D inputs
            if cache.is_quantized:
                # Read back through the codes, so a token attends to the same keys whether its
                # prompt came in one pass, in chunks, from the prefix cache or after a preemption.
                keys, values = (rows[:chunk.query_len] for rows in cache.read(chunk.block_table))
            else:  # a fresh prompt's keys are exactly this step's k/v, no gather needed
                keys, values = k[chunk.query_start:end], v[chunk.query_start:end]
            out = F.scaled_dot_product_attention(q_chunk, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                                 is_causal=True, scale=scale, enable_gqa=True)
        else:
            seq_len = chunk.context_len + chunk.query_len
            keys, values = cache.read(chunk.block_table)  # [n * block_size, KVH, D]
            keys, values = keys[:seq_len], values[:seq_len]
            out = F.scaled_dot_product_attention(q_chunk, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                                 attn_mask=chunk.mask, scale=scale, enable_gqa=True)
        parts.append(out[0].transpose(0, 1))
    if meta.attention_mass is not None:
        meta.attention_mass.record(q, cache, meta, scale)
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _decode_attention(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    out = cache.decode(q, meta, scale)  # the native kernel reads K/V through the block table, no gather
    return out if out is not None else decode_attention_reference(q, cache, meta, scale)


def decode_attention_reference(q: torch.Tensor, cache: LayerCache, meta: AttentionMetadata,
                               scale: float) -> torch.Tensor:
    """Gather each sequence's blocks, then masked SDPA. q: [N, H, D] -> [N, H, D]."""
    num_seqs, num_heads, head_dim = q.shape
    keys, values = cache.read(meta.decode_block_tables)  # [N, S, KVH, D]
    if meta.decode_mask is None:
        width = keys.shape[1]
        meta.decode_mask = (torch.arange(width)[None, :] < meta.decode_seq_lens[:, None])[:, None, None, :]
    num_kv_heads = keys.shape[2]
    # The query heads sharing one KV head act as that head's queries: [N, KVH, group, D],
    # so grouped-query attention needs no repeated keys.
    q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    out = F.scaled_dot_product_attention(q, keys.transpose(1, 2), values.transpose(1, 2),
                                         attn_mask=meta.decode_mask, scale=scale)
    return out.reshape(num_seqs, num_heads, head_dim)


def naive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference causal attention over one whole sequence, in float32 with explicit softmax.

    q: [S, H, D]; k, v: [S, KVH, D] -> [S, H, D]. Used by tests only.
    """
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1).float()
    v = v.repeat_interleave(group, dim=1).float()
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    causal = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
    scores = scores.masked_fill(~causal, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v).to(q.dtype)

"""Attention over the paged KV cache for a mixed batch of decode tokens and prefill chunks."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.attention.metadata import AttentionMetadata
from ember.kernels.ops import core_ops


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Store new keys/values. caches: [num_blocks, block_size, kv_heads, head_dim]; k, v: [T, kv_heads, head_dim]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Causal attention of the step's queries over every cached token of their sequence.

    Args:
        q: [T, num_heads, head_dim]; k, v: [T, num_kv_heads, head_dim] for the step's new tokens.
        k_cache, v_cache: [num_blocks, block_size, num_kv_heads, head_dim], updated in place.
    Returns:
        [T, num_heads, head_dim]
    """
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    parts = []
    if meta.num_decode_tokens:
        parts.append(_decode_attention(q[:meta.num_decode_tokens], k_cache, v_cache, meta, scale))
    for chunk in meta.prefills:
        end = chunk.query_start + chunk.query_len
        q_chunk = q[chunk.query_start:end].transpose(0, 1)[None]  # [1, H, n, D]: SDPA's CPU flash
        if chunk.context_len == 0:                                 # kernel wants 4-D inputs
            # Fresh prompt: its keys are exactly this step's k/v, no gather needed.
            keys, values = k[chunk.query_start:end], v[chunk.query_start:end]
            out = F.scaled_dot_product_attention(q_chunk, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                                 is_causal=True, scale=scale, enable_gqa=True)
        else:
            seq_len = chunk.context_len + chunk.query_len
            keys = _gather(k_cache, chunk.block_table)[:seq_len]  # [S, KVH, D]
            values = _gather(v_cache, chunk.block_table)[:seq_len]
            out = F.scaled_dot_product_attention(q_chunk, keys.transpose(0, 1)[None], values.transpose(0, 1)[None],
                                                 attn_mask=chunk.mask, scale=scale, enable_gqa=True)
        parts.append(out[0].transpose(0, 1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[num_blocks, bs, KVH, D] indexed by a block table [n] -> [n * bs, KVH, D]."""
    return cache[block_table].flatten(0, 1)


def _decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      meta: AttentionMetadata, scale: float) -> torch.Tensor:
    ops = core_ops()
    if ops is not None:  # reads K/V through the block table, no gather
        return ops.paged_decode_attention(q, k_cache, v_cache, meta.decode_block_tables,
                                          meta.decode_seq_lens, scale)
    return decode_attention_reference(q, k_cache, v_cache, meta, scale)


def decode_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                               meta: AttentionMetadata, scale: float) -> torch.Tensor:
    """Gather each sequence's blocks, then masked SDPA. q: [N, H, D] -> [N, H, D]."""
    num_seqs, num_heads, head_dim = q.shape
    if meta.decode_mask is None:
        width = meta.decode_block_tables.shape[1] * k_cache.shape[1]
        meta.decode_mask = (torch.arange(width)[None, :] < meta.decode_seq_lens[:, None])[:, None, None, :]
    num_kv_heads = k_cache.shape[2]
    # The query heads sharing one KV head act as that head's queries: [N, KVH, group, D],
    # so grouped-query attention needs no repeated keys.
    q = q.view(num_seqs, num_kv_heads, num_heads // num_kv_heads, head_dim)
    keys = k_cache[meta.decode_block_tables].flatten(1, 2).transpose(1, 2)  # [N, KVH, S, D]
    values = v_cache[meta.decode_block_tables].flatten(1, 2).transpose(1, 2)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=meta.decode_mask, scale=scale)
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

"""Grouped-query self-attention block (projections + RoPE + paged attention)."""

from __future__ import annotations

import torch
from torch import nn

from ember.attention.layer_cache import LayerCache
from ember.attention.metadata import AttentionMetadata
from ember.attention.paged_attention import paged_attention
from ember.models.layers.linear import fuse_linears
from ember.models.layers.precision import PrecisionMask, apply_linear
from ember.models.layers.rotary import apply_rotary_


class SelfAttention(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = head_dim ** -0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)
        self.qkv_proj: nn.Module | None = None  # set by fuse_projections()

    def fuse_projections(self) -> None:
        """Replace q/k/v by one [q; k; v] projection: one matmul per step instead of three."""
        fused = fuse_linears([self.q_proj, self.k_proj, self.v_proj])
        if fused is not None:
            self.qkv_proj = fused
            del self.q_proj, self.k_proj, self.v_proj

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor],
                kv_cache: LayerCache, meta: AttentionMetadata,
                precision: PrecisionMask | None = None) -> torch.Tensor:
        num_tokens = x.shape[0]
        if self.qkv_proj is not None:
            q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
            q, k, v = apply_linear(self.qkv_proj, x, precision).split([q_size, kv_size, kv_size], dim=-1)
        else:
            q, k, v = (apply_linear(proj, x, precision) for proj in (self.q_proj, self.k_proj, self.v_proj))
        q = q.reshape(num_tokens, self.num_heads, self.head_dim)  # [T, H, D]
        k = k.reshape(num_tokens, self.num_kv_heads, self.head_dim)  # [T, KVH, D]
        v = v.reshape(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary_(q, k, rope)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale)
        return apply_linear(self.o_proj, out.reshape(num_tokens, self.num_heads * self.head_dim), precision)

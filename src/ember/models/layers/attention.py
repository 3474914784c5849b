"""Grouped-query self-attention block (projections + RoPE + paged attention)."""

from __future__ import annotations

import torch
from torch import nn

from ember.attention.layer_cache import LayerCache
from ember.attention.metadata import AttentionMetadata
from ember.attention.paged_attention import paged_attention
from ember.models.layers.linear import fuse_linears
from ember.models.layers.norm import RMSNorm
from ember.models.layers.precision import PrecisionMask, apply_linear
from ember.models.layers.rotary import apply_rotary_


class SelfAttention(nn.Module):
    """Args beyond the shapes: `qkv_bias`/`o_proj_bias` add biases to those projections (Qwen2, Qwen3);
    `qk_norm_eps`, when set, RMS-normalises each head of q and k before RoPE (Qwen3's q_norm/k_norm);
    `scale` replaces head_dim ** -0.5; `sliding_window` limits each query to that many latest keys and
    `logit_softcap` caps the scores (Gemma)."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 qkv_bias: bool = False, o_proj_bias: bool = False, qk_norm_eps: float | None = None,
                 scale: float | None = None, sliding_window: int | None = None,
                 logit_softcap: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale if scale is not None else head_dim ** -0.5
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=o_proj_bias)
        self.qkv_proj: nn.Module | None = None  # set by fuse_projections()
        self.q_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None
        self.k_norm = RMSNorm(head_dim, qk_norm_eps) if qk_norm_eps is not None else None

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
        if self.q_norm is not None:  # per head, over head_dim: [T * H, D] rows
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(num_tokens, self.num_heads, self.head_dim)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = apply_rotary_(q, k, rope)
        out = paged_attention(q, k, v, kv_cache, meta, self.scale, self.sliding_window, self.logit_softcap)
        return apply_linear(self.o_proj, out.reshape(num_tokens, self.num_heads * self.head_dim), precision)

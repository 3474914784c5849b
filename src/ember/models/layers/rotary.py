"""Rotary position embedding (Su et al., 2021) in the rotate-half layout."""

import torch
from torch import nn

from ember.kernels.ops import core_ops


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given each token's absolute position.

    cos/sin tables for every position up to `max_positions` are built once in float32.
    """

    def __init__(self, head_dim: int, max_positions: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_positions, self.theta = head_dim, max_positions, theta
        self.register_buffer("cos_cache", torch.empty(max_positions, head_dim), persistent=False)
        self.register_buffer("sin_cache", torch.empty(max_positions, head_dim), persistent=False)
        self.reset_buffers()

    def reset_buffers(self) -> None:
        """(Re)compute the tables, e.g. after the module was created on the meta device."""
        dim = self.head_dim
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
        freqs = torch.arange(self.max_positions, dtype=torch.float32)[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)  # [max_positions, head_dim]
        self.cos_cache = emb.cos()
        self.sin_cache = emb.sin()

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin for each token, [T, 1, D] in `dtype`; computed once per step for all layers."""
        return (self.cos_cache[positions].to(dtype)[:, None, :],
                self.sin_cache[positions].to(dtype)[:, None, :])


def apply_rotary_(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    """Rotate q and k; in place on the native bfloat16 path (one op each instead of eight)."""
    if q.dtype == torch.bfloat16 and q.stride(-1) == 1 and k.stride(-1) == 1:
        ops = core_ops()
        if ops is not None:
            ops.rope_bf16_(q, *rope)
            ops.rope_bf16_(k, *rope)
            return q, k
    return apply_rotary(q, k, rope)


def apply_rotary(q: torch.Tensor, k: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]):
    """q: [T, H, D], k: [T, KVH, D] -> rotated (q, k)."""
    cos, sin = rope
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

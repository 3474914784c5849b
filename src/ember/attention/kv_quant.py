"""Int8 codes for cached keys and values: per-token (dynamic) or per-channel (static) scales, and the
4-bit residuals that correct outlier tokens. Pure tensor functions; the cache tensors own the state."""

from __future__ import annotations

import torch

INT8_MAX = 127
RESIDUAL_MAX = 7  # 4-bit residual codes hold -7..7, stored offset by 8 in a nibble
_TINY = 1e-8  # smallest scale: an all-zero row quantizes to zeros, never to NaN


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 with one scale per token and KV head ("C8-D").

    Args:
        x: [T, KVH, D] keys or values.
    Returns:
        (codes [T, KVH, D] int8, scales [T, KVH] float32), x ~ codes * scales[..., None].
    """
    x = x.float()
    scales = x.abs().amax(-1).clamp_min(_TINY) / INT8_MAX
    return _round_to_int8(x / scales[..., None]), scales


def quantize_per_channel(x: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """Int8 codes of x [T, KVH, D] under fixed per-channel scales [KVH, D] ("C8-S"); values past the
    calibrated range saturate at +-127."""
    return _round_to_int8(x.float() / scales)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, per_token: bool) -> torch.Tensor:
    """codes [..., KVH, D] int8 -> float32, with per-token scales [..., KVH] or per-channel [KVH, D]."""
    return codes.float() * (scales[..., None] if per_token else scales)


def relative_error(x: torch.Tensor, approx: torch.Tensor) -> torch.Tensor:
    """[T]: ||x - approx|| / ||x|| of each token's whole vector (every KV head)."""
    x = x.float().flatten(1)
    return (x - approx.flatten(1)).norm(dim=1) / x.norm(dim=1).clamp_min(_TINY)


def quantize_residual(error: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """4-bit codes of a quantization error, one scale per token and KV head.

    Args:
        error: [n, KVH, D] float32, D even.
    Returns:
        (packed [n, KVH, D / 2] uint8: element 2i in the low nibble, 2i + 1 in the high one, each
        offset by 8; scales [n, KVH] float32).
    """
    scales = error.abs().amax(-1).clamp_min(_TINY) / RESIDUAL_MAX
    codes = (torch.round(error / scales[..., None]).clamp_(-RESIDUAL_MAX, RESIDUAL_MAX) + 8).to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4), scales


def dequantize_residual(packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """[n, KVH, D / 2] uint8 and [n, KVH] -> [n, KVH, D] float32 (inverse of `quantize_residual`)."""
    low = (packed & 0xF).float() - 8
    high = (packed >> 4).float() - 8
    return torch.stack([low, high], dim=-1).flatten(-2) * scales[..., None]


def _round_to_int8(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x).clamp_(-INT8_MAX, INT8_MAX).to(torch.int8)

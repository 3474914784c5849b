"""Bit packing of integer weight codes: int4 two per byte, int8 stored as is."""
from __future__ import annotations

import torch


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack unsigned 4-bit codes two per byte along the last dimension.

    Args:
        codes: integer tensor [..., K] with values in [0, 15], K even.
    Returns:
        uint8 tensor [..., K // 2]; column 2j sits in the low nibble, 2j+1 in the high nibble.
    Raises:
        ValueError: if K is odd or a value lies outside [0, 15].
    """
    if codes.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dimension, got {codes.shape[-1]}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) > 15):
        raise ValueError("pack_int4 codes must lie in [0, 15]")
    codes = codes.to(torch.uint8)
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 [..., K // 2] -> uint8 codes [..., K] in [0, 15]."""
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4 expects uint8, got {packed.dtype}")
    low = packed & 0x0F
    high = packed >> 4
    return torch.stack((low, high), dim=-1).flatten(-2)


def pack_int8(codes: torch.Tensor) -> torch.Tensor:
    """Store signed 8-bit codes in [-128, 127] as int8 (one per byte)."""
    if codes.numel() and (int(codes.min()) < -128 or int(codes.max()) > 127):
        raise ValueError("pack_int8 codes must lie in [-128, 127]")
    return codes.to(torch.int8)


def unpack_int8(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int8``."""
    if packed.dtype != torch.int8:
        raise ValueError(f"unpack_int8 expects int8, got {packed.dtype}")
    return packed

"""Weight repacks the native kernels read: AMX B tiles (bf16 pairs, int8 quads, 4-bit lanes) and VNNI 4-bit chunks.

Every repack keeps the weight's size; each is computed once per layer by a kernel's prepare().
"""
from __future__ import annotations

import torch

from ember.kernels.linear.pack import pack_int4, unpack_int4

TILE_N = 16  # columns per AMX B tile (and rows per tile)
TILE_K_BF16 = 32  # k values per bf16 tile (16 pairs)
TILE_K_INT8 = 64  # k values per int8 tile (16 quads)
VNNI_BLOCK_N = 16  # output channels per vector of int32 sums (W4A8)
VNNI_CHUNK_K = 8  # k values per 64-byte chunk of repacked 4-bit codes (W4A8)
PANEL_BLOCK_N = 16  # output channels per block of a bf16 pair panel (bf16_dpbf16), two blocks a panel


def b_tiles(matrix: torch.Tensor, per_row: int) -> torch.Tensor:
    """[N, C] -> [N / 16, C / (16 per_row), 16, 16 per_row]: one AMX B tile contiguous, its row r holding
    elements r * per_row ... (r + 1) * per_row - 1 of each of its 16 columns (per_row: what one column
    puts in a 64-byte tile row, e.g. 2 bf16 values or 4 int8 codes). Same size as ``matrix``."""
    rows = matrix.shape[0]
    grouped = matrix.reshape(rows // TILE_N, TILE_N, -1, 16, per_row)
    # [N / 16, 16 columns, tiles along C, 16 tile rows, per_row] -> [N / 16, tiles, 16 tile rows, 16 columns, per_row]
    return grouped.permute(0, 2, 3, 1, 4).reshape(rows // TILE_N, -1, 16, TILE_N * per_row).contiguous()


def tile_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] -> [N / 16, K / 32, 16, 32]: one AMX B tile contiguous, row r holding k values 2r
    and 2r + 1 of each of the 16 columns (the VNNI pair layout of ``tdpbf16ps``). Same size."""
    return b_tiles(weight.to(torch.bfloat16), 2)


def tile_woq_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, K] (int8) or [N, K / 2] (uint8 pairs) -> uint8 [N / 16, K / 32, 16, 16 * bytes per pair].

    One B tile's codes are contiguous, row r holding k pair r of its 16 columns. 8 bits: the two
    codes of each column, even k first. 4 bits: byte j holds lane j of the row's two float32 halves
    (columns 0-7 and 8-15, even and odd k interleaved) in its low and high nibble, so the kernel widens
    a row with one zero-extension, a mask and a shift. Same size as ``qweight``.
    """
    if bits == 8:
        return b_tiles(qweight.view(torch.uint8), 2)
    codes = unpack_int4(qweight)  # [N, K]
    rows, cols = codes.shape
    # [N / 16, 2 halves, 8 columns, K / 32, 16 k pairs, 2] -> [N / 16, K / 32, 16 k pairs, 8 columns, 2, 2 halves]:
    # the two halves of a lane side by side, which pack_int4 puts in one byte
    lanes = codes.view(rows // TILE_N, 2, 8, cols // TILE_K_BF16, 16, 2).permute(0, 3, 4, 2, 5, 1)
    return pack_int4(lanes.reshape(rows // TILE_N, cols // TILE_K_BF16, 16, 32)).contiguous()


def tile_params(params: torch.Tensor) -> torch.Tensor:
    """Per-group float parameters [N, G] -> [N / 16, G, 16] (one tile's 16 columns contiguous)."""
    rows, groups = params.shape
    return params.float().view(rows // TILE_N, TILE_N, groups).transpose(1, 2).contiguous()


def tile_int8_codes(qweight: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> [N / 16, K / 64, 16, 64]: one B tile contiguous, row r holding k values
    4r..4r+3 of each of the 16 columns (the quad layout of ``tdpbssd``). Same size as ``qweight``."""
    return b_tiles(qweight, 4)


def vnni_codes(qweight: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K / 2] (two per byte) -> uint8 [N / 16, K / 8, 64]: per block of 16 channels and
    chunk c of 8 k values, byte 4l + i holds channel l's k = 8c + i (low nibble) and 8c + 4 + i (high),
    so the low nibbles are one ``vpdpbusd`` operand of k quad 2c and the high ones of quad 2c + 1."""
    codes = unpack_int4(qweight)  # [N, K]
    rows, cols = codes.shape
    # [N / 16, 16 channels, K / 8, 2 quads, 4] -> [N / 16, K / 8, 16 channels, 4, 2 quads]: pack_int4 puts
    # the two quads of a byte side by side (low nibble first)
    chunks = codes.view(rows // VNNI_BLOCK_N, VNNI_BLOCK_N, cols // VNNI_CHUNK_K, 2, 4).permute(0, 2, 1, 4, 3)
    return pack_int4(chunks.reshape(rows // VNNI_BLOCK_N, cols // VNNI_CHUNK_K, 128)).contiguous()


def pair_panels(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] (N % 16 == 0, K even) -> int32 words [N K / 2], the panels ``bf16_linear_dpbf16`` reads:
    32 channels a panel as [K / 2][2][16] (pair p, block b, word c: channel 32 i + 16 b + c's k = 2p in the
    low half and k = 2p + 1 in the high half, the pair ``vdpbf16ps`` multiplies), then a last panel of 16
    channels as [K / 2][16] when N % 32 == 16. A call reads each panel as one stream. Same size."""
    n, k = weight.shape
    words = weight.contiguous().view(torch.int32)  # [N, K / 2]: k even in the low half (little endian)
    full = n // (2 * PANEL_BLOCK_N) * 2 * PANEL_BLOCK_N
    head = words[:full].view(-1, 2, PANEL_BLOCK_N, k // 2).permute(0, 3, 1, 2).reshape(-1)
    tail = words[full:].view(-1, PANEL_BLOCK_N, k // 2).permute(0, 2, 1).reshape(-1)
    return torch.cat([head, tail])

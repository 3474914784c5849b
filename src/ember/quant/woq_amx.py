"""Weight-only AMX-BF16 kernel operands: the tile repack of the codes and the backend's three hooks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ember.quant.amx import TILE_N, b_tiles, has_amx
from ember.quant.native import quant_ops
from ember.quant.pack import pack_int4, unpack_int4

if TYPE_CHECKING:
    from ember.quant.linear import QuantLinear

TILE_K = 32  # k values per tile (16 bf16 pairs)


def tile_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
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
    lanes = codes.view(rows // TILE_N, 2, 8, cols // TILE_K, 16, 2).permute(0, 3, 4, 2, 5, 1)
    return pack_int4(lanes.reshape(rows // TILE_N, cols // TILE_K, 16, 32)).contiguous()


def tile_params(params: torch.Tensor) -> torch.Tensor:
    """Per-group float parameters [N, G] -> [N / 16, G, 16] (one tile's 16 columns contiguous)."""
    rows, groups = params.shape
    return params.float().view(rows // TILE_N, TILE_N, groups).transpose(1, 2).contiguous()


def supports(layer: "QuantLinear", dtype: torch.dtype) -> bool:
    """bfloat16 activations, weight-only, N % 16 == 0, K and the group length multiples of 32."""
    return (layer.act_bits is None and dtype == torch.bfloat16 and layer.out_features % TILE_N == 0
            and layer.in_features % TILE_K == 0 and layer.scheme.group_len(layer.in_features) % TILE_K == 0
            and has_amx())


def prepare(layer: "QuantLinear", dtype: torch.dtype) -> Any:
    weight = layer.quantized_weight()
    return (tile_codes(layer.qweight, layer.scheme.bits), tile_params(weight.scales),
            tile_params(weight.group_offsets()))


def run(x: torch.Tensor, layer: "QuantLinear", prepared: Any) -> torch.Tensor:
    """y [M, N] bf16 without bias (the caller adds it as the other backends do)."""
    codes, scales, offsets = prepared
    return quant_ops().woq_linear_amx(x, codes, scales, offsets, layer.scheme.bits, layer.out_features)

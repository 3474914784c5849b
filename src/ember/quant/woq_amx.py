"""Weight-only AMX-BF16 kernel operands: the tile repack of the codes and the backend's three hooks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ember.quant.amx import TILE_N, b_tiles, has_amx
from ember.quant.native import quant_ops

if TYPE_CHECKING:
    from ember.quant.linear import QuantLinear

TILE_K = 32  # k values per tile (16 bf16 pairs)


def tile_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes [N, K] (int8) or [N, K / 2] (uint8 pairs) -> uint8 [N / 16, K / 32, 16, 16 * bytes per pair].

    One B tile's codes are contiguous, row r holding k pair r of the 16 columns: a byte per pair at
    4 bits (low nibble = even k, as stored), two bytes at 8 bits. Same size as ``qweight``.
    """
    return b_tiles(qweight.view(torch.uint8), 1 if bits == 4 else 2)


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

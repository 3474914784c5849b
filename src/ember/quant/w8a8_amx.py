"""W8A8 AMX-INT8 kernel operands: the tile repack of the weight codes and the backend's three hooks."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ember.quant.amx import TILE_N, b_tiles, has_amx_int8
from ember.quant.native import quant_ops

if TYPE_CHECKING:
    from ember.quant.linear import QuantLinear

TILE_K = 64  # k values per tile (16 quads of int8 codes)


def tile_codes(qweight: torch.Tensor) -> torch.Tensor:
    """int8 codes [N, K] -> [N / 16, K / 64, 16, 64]: one B tile contiguous, row r holding k values
    4r..4r+3 of each of the 16 columns (the quad layout of ``tdpbssd``). Same size as ``qweight``."""
    return b_tiles(qweight, 4)


def supports(layer: "QuantLinear", dtype: torch.dtype) -> bool:
    """W8A8 with per-channel weight scales, bf16 or float32 activations, N % 16 == 0, K % 64 == 0."""
    return (layer.act_bits == 8 and layer.scheme.bits == 8 and layer.scales.shape[1] == 1
            and dtype in (torch.bfloat16, torch.float32) and layer.out_features % TILE_N == 0
            and layer.in_features % TILE_K == 0 and has_amx_int8())


def prepare(layer: "QuantLinear", dtype: torch.dtype) -> Any:
    return tile_codes(layer.qweight), layer.scales.view(-1).float().contiguous()


def run(x: torch.Tensor, layer: "QuantLinear", prepared: Any) -> torch.Tensor:
    """y [M, N] in x's dtype, bias included: per-token int8 codes of x times the tiled weight."""
    w_tiles, w_scale = prepared
    codes, x_scale = quant_ops().quantize_rows_int8(x)
    return quant_ops().w8a8_linear_amx(codes, x_scale, w_tiles, w_scale, layer.bias, x.dtype)

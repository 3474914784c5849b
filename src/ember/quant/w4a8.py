"""W4A8 kernel operands (csrc/w4a8_vnni.cpp): the VNNI repack of 4-bit codes and the backend's three hooks."""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Any

import torch

from ember.quant.native import quant_ops
from ember.quant.pack import pack_int4, unpack_int4
from ember.quant.woq_amx import tile_params

if TYPE_CHECKING:
    from ember.quant.linear import QuantLinear

BLOCK_N = 16  # output channels per vector of int32 sums
CHUNK_K = 8  # k values per 64-byte chunk of repacked codes


def vnni_codes(qweight: torch.Tensor) -> torch.Tensor:
    """4-bit codes [N, K / 2] (two per byte) -> uint8 [N / 16, K / 8, 64]: per block of 16 channels and
    chunk c of 8 k values, byte 4l + i holds channel l's k = 8c + i (low nibble) and 8c + 4 + i (high),
    so the low nibbles are one ``vpdpbusd`` operand of k quad 2c and the high ones of quad 2c + 1."""
    codes = unpack_int4(qweight)  # [N, K]
    rows, cols = codes.shape
    # [N / 16, 16 channels, K / 8, 2 quads, 4] -> [N / 16, K / 8, 16 channels, 4, 2 quads]: pack_int4 puts
    # the two quads of a byte side by side (low nibble first)
    chunks = codes.view(rows // BLOCK_N, BLOCK_N, cols // CHUNK_K, 2, 4).permute(0, 2, 1, 4, 3)
    return pack_int4(chunks.reshape(rows // BLOCK_N, cols // CHUNK_K, 128)).contiguous()


@functools.cache
def has_w4a8_vnni() -> bool:
    ops = quant_ops()
    return ops is not None and bool(ops.has_w4a8_vnni())


def supports(layer: "QuantLinear", dtype: torch.dtype) -> bool:
    """W4A8 (4-bit weights, act_bits 8), bf16 or float32 activations, N % 16 == 0, group length % 16 == 0."""
    return (layer.act_bits == 8 and layer.scheme.bits == 4 and dtype in (torch.bfloat16, torch.float32)
            and layer.out_features % BLOCK_N == 0 and layer.scheme.group_len(layer.in_features) % 16 == 0
            and has_w4a8_vnni())


def prepare(layer: "QuantLinear", dtype: torch.dtype) -> Any:
    weight = layer.quantized_weight()
    return (quant_ops().w4a8_linear, vnni_codes(layer.qweight), tile_params(weight.scales),
            tile_params(weight.group_offsets()), weight.scheme.group_len(layer.in_features))


def run(x: torch.Tensor, layer: "QuantLinear", prepared: Any) -> torch.Tensor:
    """y [M, N] in x's dtype, bias included (one native call: a decode step makes 120 of them)."""
    linear, codes, scales, offsets, group_len = prepared
    return linear(x, codes, scales, offsets, layer.bias, group_len)

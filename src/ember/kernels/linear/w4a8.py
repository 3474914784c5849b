"""The W4A8 kernel: 4-bit weight codes against int8 activations per token and weight group on AVX512-VNNI
(exact int32 sums per group with vpdpbusd, float32 across groups), llama.cpp's Q4 x Q8 scheme."""

from __future__ import annotations

import torch

from ember.kernels.linear.base import LinearKernel, LinearWeights, require
from ember.kernels.linear.spec import W4A8, LinearSpec
from ember.kernels.linear.tiles import VNNI_BLOCK_N, tile_params, vnni_codes
from ember.kernels.ops import native_has, quant_ops


def _check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((dtype in (torch.bfloat16, torch.float32), "bfloat16 or float32 activations only"),
                   (spec.out_features % VNNI_BLOCK_N == 0 and spec.group_len % 16 == 0,
                    "needs N % 16 == 0 and a group length % 16 == 0"),
                   (native_has("quant", "avx512_vnni") and native_has("quant", "avx512_bf16"),
                    "no AVX512-VNNI and AVX512-BF16 in the native build here"))


def _prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype):
    weight = weights.quantized
    bias = None if weights.bias is None else weights.bias.float()
    return (quant_ops().w4a8_linear, vnni_codes(weight.qweight), tile_params(weight.scales),
            tile_params(weight.group_offsets()), bias, spec.group_len)


def _run(x: torch.Tensor, spec: LinearSpec, operands) -> torch.Tensor:
    linear, *args = operands  # the bound native op is kept: a decode step makes 120 of these calls
    return linear(x, *args)


def _native(spec: LinearSpec, operands) -> tuple[list[torch.Tensor], int]:
    _, codes, scales, offsets, bias, group_len = operands
    return [codes, scales, offsets] + ([] if bias is None else [bias]), group_len


W4A8_VNNI = LinearKernel("w4a8_vnni", frozenset({W4A8}), _check, _prepare, _run, fuses_bias=True, native=_native)

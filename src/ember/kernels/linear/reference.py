"""The reference path of quantized linears, which every quantized kernel is tested against: dequantize
then matmul (weight-only), exact integer products of the activation codes (W8A8, W4A8)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.kernels.linear.base import LinearKernel, LinearWeights, always
from ember.kernels.linear.spec import W4A8, W8A8, WEIGHT_ONLY, LinearSpec, QuantizedWeight

QUANT_KINDS = frozenset({WEIGHT_ONLY, W8A8, W4A8})


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row: x [M, K] -> (codes int8 [M, K], scales float32 [M, 1])."""
    scale = x.float().abs().amax(dim=1, keepdim=True).clamp(min=1e-8) / 127.0
    return torch.round(x.float() / scale).clamp(-127, 127).to(torch.int8), scale


def quantize_per_group(x: torch.Tensor, group_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric int8 per row and block of ``group_len`` columns: x [M, K] -> (codes int8 [M, K],
    scales float32 [M, K / group_len])."""
    blocks = x.float().view(x.shape[0], -1, group_len)
    scale = blocks.abs().amax(dim=2, keepdim=True).clamp(min=1e-8) / 127.0
    codes = torch.round(blocks / scale).clamp(-127, 127).to(torch.int8)
    return codes.view(x.shape), scale.squeeze(2)


def w4a8_reference(x: torch.Tensor, weight: QuantizedWeight) -> torch.Tensor:
    """sum_g xs[m, g] * (s[n, g] * A[m, n, g] + o[n, g] * Q[m, g]) with A, Q exact integer sums, in float64."""
    group_len = weight.scheme.group_len(weight.in_features)
    codes, x_scale = quantize_per_group(x, group_len)
    rows, groups = x.shape[0], x_scale.shape[1]
    xq = codes.view(rows, groups, group_len).float()
    # products of codes up to 127 * 15 summed over a group stay exact in float32 (below 2^24)
    acc = torch.einsum("mgl,ngl->mng", xq, weight.codes().view(-1, groups, group_len).float()).double()
    sums = xq.sum(dim=2).double()  # [M, G]
    y = (acc * weight.scales.double() + weight.group_offsets().double() * sums.unsqueeze(1))  # [M, N, G]
    return (y * x_scale.double().unsqueeze(1)).sum(dim=2).to(x.dtype)


def _reference_run(x: torch.Tensor, spec: LinearSpec, weight: QuantizedWeight) -> torch.Tensor:
    """Weight-only: dequantize W to x's dtype and matmul. W8A8: per-token int8 x, exact int products.
    W4A8: int8 x per token and weight group, exact int products per group."""
    if spec.kind == W4A8:
        return w4a8_reference(x, weight)
    if spec.kind == W8A8:
        codes, x_scale = quantize_per_token(x)
        # int8 x int8 products summed in float64 are exact for any practical K
        acc = codes.double() @ weight.codes().double().T  # [M, N]
        return (acc * x_scale.double() * weight.scales.double().view(1, -1)).to(x.dtype)
    return F.linear(x, weight.dequantize(x.dtype))


def _reference_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype) -> QuantizedWeight:
    return weights.quantized


REFERENCE = LinearKernel("reference", QUANT_KINDS, always, _reference_prepare, _reference_run)

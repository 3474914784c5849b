"""Kernels for 8-bit weights against dynamic int8 activations per token (W8A8): the native VNNI GEMV and
AMX-INT8 tiles, fbgemm, oneDNN on a prepacked weight, and torch._int_mm.

Where each one wins is measured in docs/performance.md ("Quantized linears").
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch

from ember.kernels.linear.base import LinearKernel, LinearWeights, require
from ember.kernels.linear.reference import quantize_per_token
from ember.kernels.linear.spec import W8A8, LinearSpec
from ember.kernels.linear.tiles import TILE_K_INT8, TILE_N, tile_int8_codes
from ember.kernels.linear.weight_only import in_row_chunks
from ember.kernels.cpu import cpu_features
from ember.kernels.ops import native_has, quant_ops

W8A8_KINDS = frozenset({W8A8})
# fbgemm wins the smallest calls only: up to this many tokens (docs/performance.md)
FBGEMM_MAX_TOKENS = 8
# oneDNN's int8 matmuls fall off a cliff for tall inputs (docs/performance.md): calls are cut into
# chunks of this many rows
INT_MM_MAX_ROWS = 1024


def _scales(weights: LinearWeights) -> torch.Tensor:
    return weights.quantized.scales.view(-1).float().contiguous()


def _bias(weights: LinearWeights) -> torch.Tensor | None:
    return None if weights.bias is None else weights.bias.float()


def _rescaled_in_chunks(codes: torch.Tensor, x_scale: torch.Tensor, matmul: Callable[[torch.Tensor], torch.Tensor],
                        w_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """matmul(codes) rescaled per row (native pass), in chunks of ``INT_MM_MAX_ROWS`` rows.

    Rescaling chunk by chunk also keeps a whole prefill's float32/int32 [M, N] from being allocated
    (its page faults cost more than the rescale).
    """
    ops = quant_ops()
    outs = [ops.rescale_rows(matmul(rows), scale, w_scale, bias, dtype)
            for rows, scale in zip(codes.split(INT_MM_MAX_ROWS), x_scale.split(INT_MM_MAX_ROWS))]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


# --- few tokens: native VNNI GEMV of exact int32 sums, then rescale_rows, in one call ---------------
def _gemv_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((dtype in (torch.bfloat16, torch.float32), "bfloat16 or float32 activations only"),
                   (native_has("quant", "avx512_vnni"), "no AVX512-VNNI in the native build here"))


def _gemv_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype):
    codes = weights.quantized.qweight.contiguous()
    return codes, codes.sum(dim=1, dtype=torch.int32), _scales(weights), _bias(weights)


def _gemv_run(x: torch.Tensor, spec: LinearSpec, operands) -> torch.Tensor:
    ops = quant_ops()
    return in_row_chunks(x, ops.max_gemv_tokens, lambda rows: ops.w8a8_linear_gemv(rows, *operands))


def _gemv_native(spec: LinearSpec, operands) -> tuple[list[torch.Tensor], int]:
    codes, sums, scales, bias = operands
    return [codes, sums, scales] + ([] if bias is None else [bias]), 0


W8A8_GEMV = LinearKernel("w8a8_gemv", W8A8_KINDS, _gemv_check, _gemv_prepare, _gemv_run, fuses_bias=True,
                         max_tokens=lambda spec: quant_ops().max_gemv_tokens, native=_gemv_native)


# --- fbgemm linear_dynamic on row-normalised activations (per token in effect) ----------------------
def _fbgemm_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((cpu_features().vnni, "fbgemm's int8 products are inexact without VNNI (vpmaddubsw saturates)"),
                   (hasattr(torch.ops.quantized, "linear_dynamic")
                    and "fbgemm" in torch.backends.quantized.supported_engines, "torch has no fbgemm"))


def _fbgemm_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype):
    weight = weights.quantized
    with warnings.catch_warnings():  # the eager quantized-tensor API is deprecated upstream
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            weight.codes().to(torch.int8), weight.scales.view(-1).double(),
            torch.zeros(spec.out_features, dtype=torch.long), 0)
        packed = torch.ops.quantized.linear_prepack(qweight, None)
    return packed, _bias(weights)  # the bias is added in float32 after the row rescale


def _fbgemm_run(x: torch.Tensor, spec: LinearSpec, operands) -> torch.Tensor:
    packed, bias = operands
    # fbgemm quantizes activations per tensor; one token with massive activations (attention-sink
    # tokens reach hundreds) would crush every other row. Normalising each row to max|x| = 1 first
    # makes the per-tensor range the per-token one; the row scale is applied to the output.
    xf = x.float()
    if xf.shape[0] == 1:  # one token: per tensor is per token already
        y = torch.ops.quantized.linear_dynamic(xf.contiguous(), packed, False)
    else:
        row_scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)  # [M, 1]
        y = torch.ops.quantized.linear_dynamic((xf / row_scale).contiguous(), packed, False) * row_scale
    return (y if bias is None else y + bias).to(x.dtype)


FBGEMM_W8A8 = LinearKernel("fbgemm_w8a8", W8A8_KINDS, _fbgemm_check, _fbgemm_prepare, _fbgemm_run, fuses_bias=True,
                           max_tokens=lambda spec: FBGEMM_MAX_TOKENS)


# --- torch._int_mm with per-token int8 activations ---------------------------------------------------
def _int_mm_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype):
    return weights.quantized.qweight.t().contiguous(), _scales(weights), _bias(weights)  # [K, N], [N]


def _int_mm_run(x: torch.Tensor, spec: LinearSpec, operands) -> torch.Tensor:
    weight_t, w_scale, bias = operands
    if native_has("quant") and x.dtype in (torch.bfloat16, torch.float32):
        codes, x_scale = quant_ops().quantize_rows_int8(x)
        return _rescaled_in_chunks(codes, x_scale, lambda rows: torch._int_mm(rows, weight_t), w_scale, bias, x.dtype)
    codes, x_scale = quantize_per_token(x)
    acc = torch.cat([torch._int_mm(rows, weight_t) for rows in codes.split(INT_MM_MAX_ROWS)])  # int32 [M, N]
    y = (acc.float() * x_scale * w_scale.view(1, -1)).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


INT_MM_W8A8 = LinearKernel("int_mm_w8a8", W8A8_KINDS, lambda spec, dtype: None, _int_mm_prepare, _int_mm_run,
                           fuses_bias=True)


# --- oneDNN u8 x s8 matmul on a prepacked weight (AMX-INT8 or VNNI inside oneDNN) --------------------
def _onednn_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((dtype in (torch.bfloat16, torch.float32), "bfloat16 or float32 activations only"),
                   (native_has("quant"), "needs the native quant build (per-token codes)"),
                   # without VNNI oneDNN multiplies u8 x s8 with vpmaddubsw, whose int16 pair sums saturate
                   (cpu_features().vnni, "oneDNN's int8 products are inexact without VNNI"),
                   (hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available(),
                    "torch has no oneDNN int8 linear"))


def _onednn_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype):
    packed = torch.ops.onednn.qlinear_prepack(weights.quantized.qweight.contiguous(), None)
    w_scale = _scales(weights)
    return packed, w_scale, torch.zeros_like(w_scale, dtype=torch.long), torch.ones_like(w_scale), _bias(weights)


def _onednn_run(x: torch.Tensor, spec: LinearSpec, operands) -> torch.Tensor:
    packed, w_scale, w_zero, ones, bias = operands
    # per-token codes shifted to uint8 (zero point 128); oneDNN's activation scale is per tensor, so it
    # gets 1 and the row scales are applied to its float32 output (= integer products * weight scale)
    codes, x_scale = quant_ops().quantize_rows_int8(x, shift128=True)

    def matmul(rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(rows, 1.0, 128, packed, w_scale, w_zero, None, 1.0, 0,
                                                  torch.float32, "none", [], "")

    return _rescaled_in_chunks(codes, x_scale, matmul, ones, bias, x.dtype)


ONEDNN_W8A8 = LinearKernel("onednn_w8a8", W8A8_KINDS, _onednn_check, _onednn_prepare, _onednn_run, fuses_bias=True)


# --- AMX-INT8 tiles, the row and column rescale (+ bias) fused into the store ------------------------
def _amx_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((spec.per_channel, "per-channel weight scales only"),
                   (dtype in (torch.bfloat16, torch.float32), "bfloat16 or float32 activations only"),
                   (spec.out_features % TILE_N == 0 and spec.in_features % TILE_K_INT8 == 0,
                    "needs N % 16 == 0 and K % 64 == 0"),
                   (native_has("quant", "amx"), "no AMX-INT8 tiles here (or EMBER_DISABLE_AMX=1)"))


def _amx_run(x: torch.Tensor, spec: LinearSpec, operands) -> torch.Tensor:
    w_tiles, w_scale, bias = operands
    codes, x_scale = quant_ops().quantize_rows_int8(x)
    return quant_ops().w8a8_linear_amx(codes, x_scale, w_tiles, w_scale, bias, x.dtype)


W8A8_AMX = LinearKernel(
    "w8a8_amx", W8A8_KINDS, _amx_check,
    lambda spec, w, dtype: (tile_int8_codes(w.quantized.qweight), _scales(w), _bias(w)), _amx_run, fuses_bias=True)

W8A8_KERNELS = (W8A8_AMX, W8A8_GEMV, FBGEMM_W8A8, ONEDNN_W8A8, INT_MM_W8A8)

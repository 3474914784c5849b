"""Kernels for float (dense) weights: AMX tiles, the AVX512-BF16 GEMV and pair panels for short bfloat16
calls, oneDNN on a prepacked weight (bfloat16 and float32), and torch's F.linear as the reference.

Where each one wins is measured in docs/performance.md ("Kernel limits").
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ember.kernels.linear.base import LinearKernel, LinearWeights, always, require
from ember.kernels.linear.spec import DENSE, LinearSpec
from ember.kernels.linear.tiles import PANEL_BLOCK_N, TILE_K_BF16, TILE_N, pair_panels, tile_bf16_weight
from ember.kernels.ops import core_ops, native_has

DENSE_KINDS = frozenset({DENSE})
# oneDNN picks the packed layout for this many rows; one layout packed for 64 rows serves 1..1024 rows
# within noise of the best layout for each (measured on this model's shapes)
PACK_BATCH_HINT = 64
# the AMX tile kernel beats oneDNN up to 256 tokens, but on a very wide layer (the LM head) only up to 32
AMX_MAX_TOKENS = 256
AMX_MAX_TOKENS_WIDE = 32
WIDE_OUT_FEATURES = 16384
# the pair-panel kernel beats the GEMV from 3 tokens and oneDNN up to 64 (Zen 4, docs/performance.md)
PANELS_MIN_TOKENS = 3
PANELS_MAX_TOKENS = 64


@functools.cache
def onednn_bf16_available() -> bool:
    """Whether torch's oneDNN runs bfloat16 matmuls on this CPU (it needs AVX512-BF16, AMX or AVX-512 emulation)."""
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def _reference_run(x: torch.Tensor, spec: LinearSpec, weight: torch.Tensor) -> torch.Tensor:
    return F.linear(x, weight)


# operands are per activation dtype: the weight in that dtype (itself when they match)
DENSE_REFERENCE = LinearKernel("dense_reference", DENSE_KINDS, always, lambda spec, w, dtype: w.weight.to(dtype),
                               _reference_run)


def _onednn_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((dtype == torch.bfloat16, "bfloat16 activations only"),
                   (onednn_bf16_available(), "torch's oneDNN has no bfloat16 matmul on this CPU"))


def _onednn_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype) -> torch.Tensor:
    # reordered once into oneDNN's blocked layout: F.linear would reorder the weight inside every call
    return torch.ops.mkldnn._reorder_linear_weight(weights.weight.to(torch.bfloat16), PACK_BATCH_HINT)


ONEDNN_BF16 = LinearKernel(
    "onednn_bf16", DENSE_KINDS, _onednn_check, _onednn_prepare,
    lambda x, spec, packed: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
    native=lambda spec, packed: ([packed], 0))  # the decode loop calls the same op through the dispatcher


def _onednn_f32_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((dtype == torch.float32, "float32 activations only"),
                   (torch.backends.mkldnn.is_available(), "torch was built without oneDNN"))


# float32 through oneDNN on a prepacked weight: F.linear packs the weight inside every call with more
# than one row (2-4x slower from 2 to 16 rows, the rows a verification step has), and its single-row path
# reads the LM head at half the speed (docs/performance.md, "Float32 linears")
ONEDNN_F32 = LinearKernel(
    "onednn_f32", DENSE_KINDS, _onednn_f32_check,
    lambda spec, w, dtype: torch.ops.mkldnn._reorder_linear_weight(w.weight.float().contiguous(), PACK_BATCH_HINT),
    lambda x, spec, packed: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""))


def _amx_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((dtype == torch.bfloat16, "bfloat16 activations only"),
                   (spec.out_features % TILE_N == 0 and spec.in_features % TILE_K_BF16 == 0,
                    "needs N % 16 == 0 and K % 32 == 0"),
                   (native_has("core", "amx"), "no AMX-BF16 tiles here (or EMBER_DISABLE_AMX=1)"))


AMX_BF16 = LinearKernel(
    "amx_bf16", DENSE_KINDS, _amx_check, lambda spec, w, dtype: tile_bf16_weight(w.weight),
    lambda x, spec, tiles: core_ops().bf16_linear_amx(x, tiles, spec.out_features),
    max_tokens=lambda spec: AMX_MAX_TOKENS_WIDE if spec.out_features >= WIDE_OUT_FEATURES else AMX_MAX_TOKENS,
    native=lambda spec, tiles: ([tiles], spec.out_features))


def _gemv_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((dtype == torch.bfloat16, "bfloat16 activations only"),
                   (spec.in_features % 32 == 0, "needs K % 32 == 0"),
                   (native_has("core", "avx512_bf16"), "no AVX512-BF16 in the native build here"))


# a decode step streams every weight once: the GEMV reads the row-major weight as fast as a plain read,
# oneDNN's small-row kernel at about half that (docs/performance.md)
BF16_GEMV = LinearKernel(
    "bf16_gemv", DENSE_KINDS, _gemv_check, lambda spec, w, dtype: w.weight.to(torch.bfloat16).contiguous(),
    lambda x, spec, rows: core_ops().bf16_gemv(x, rows),
    max_tokens=lambda spec: core_ops().max_gemv_tokens, native=lambda spec, rows: ([rows], 0))

def _panels_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((dtype == torch.bfloat16, "bfloat16 activations only"),
                   (spec.out_features % PANEL_BLOCK_N == 0 and spec.in_features % 2 == 0, "needs N % 16 == 0 and K even"),
                   (native_has("core", "avx512_bf16"), "no AVX512-BF16 in the native build here"),
                   (not native_has("core", "amx"), "AMX tiles run here (amx_bf16, then oneDNN on AMX)"))


# 3 to 64 rows on AVX512-BF16 without AMX: the weight prepacked once into pair panels and streamed once a
# call, blocks of 12 rows multiplied from cache; oneDNN's small-row kernel reads the weight at about half
# the memory's speed, the GEMV slows down past 2 rows (docs/performance.md, "Kernel limits")
BF16_DPBF16 = LinearKernel(
    "bf16_dpbf16", DENSE_KINDS, _panels_check, lambda spec, w, dtype: pair_panels(w.weight.to(torch.bfloat16)),
    lambda x, spec, panels: core_ops().bf16_linear_dpbf16(x, panels, spec.out_features),
    max_tokens=lambda spec: PANELS_MAX_TOKENS, min_tokens=PANELS_MIN_TOKENS,
    native=lambda spec, panels: ([panels], spec.out_features))

DENSE_KERNELS = (AMX_BF16, BF16_DPBF16, BF16_GEMV, ONEDNN_BF16, ONEDNN_F32, DENSE_REFERENCE)


# Input channels kept in float beside a quantized weight (QuantLinear): x[:, index] @ weight^T, padded to the
# GEMV's K step so decode-sized calls take it, in the module and in the native decode loop alike.
CHANNEL_STEP = 32


def pad_channels(index: torch.Tensor, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index, weight [N, C]) padded to a multiple of ``CHANNEL_STEP`` channels: the first channel again, with
    zero weights."""
    pad = -index.numel() % CHANNEL_STEP
    index = torch.cat([index, index[:1].expand(pad)])
    return index.contiguous(), F.pad(weight, (0, pad)).contiguous()


def add_channels(out: torch.Tensor, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """out [M, N] + x[:, index] @ weight^T as decode_layers.cpp computes it: up to the GEMV's row count the
    bf16 GEMV gathers the channels and adds each sum to ``out`` in place (rounded once), else F.linear and an
    add."""
    if (x.dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and native_has("core", "avx512_bf16")
            and x.shape[0] <= core_ops().max_gemv_tokens):
        return core_ops().bf16_gemv_channels_(out.contiguous(), x, index, weight)
    return out + F.linear(x.index_select(1, index), weight)

"""Kernels for integer weights with float activations: torch's packed int4/int8 matmuls, the native int8
GEMV, batched calls on AMX tiles or (without AMX) on `vdpbf16ps` panels, each dequantized on the fly, and
dequantize-then-dense-matmul for the rest.

Where each one wins is measured in docs/performance.md ("Kernel limits").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ember.kernels.linear.base import LinearKernel, LinearWeights, require
from ember.kernels.linear.spec import WEIGHT_ONLY, LinearSpec, dequantize_codes
from ember.kernels.linear.tiles import TILE_K_BF16, TILE_N, tile_params, tile_woq_codes
from ember.kernels.ops import native_has, quant_ops

WEIGHT_ONLY_KINDS = frozenset({WEIGHT_ONLY})
HALF_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# crossovers against the batched kernels (docs/performance.md): packed int4 / int8 up to these many tokens
INT4_MAX_TOKENS = 48
INT8_MAX_TOKENS = 16
# woq_amx runs calls up to this many tokens; a longer prefill step is faster dequantized once
WOQ_AMX_MAX_TOKENS = 1024


def in_row_chunks(x: torch.Tensor, rows: int, fn) -> torch.Tensor:
    """fn(x) for x of at most ``rows`` rows, else fn over chunks of that size, concatenated."""
    if x.shape[0] <= rows:
        return fn(x)
    return torch.cat([fn(chunk) for chunk in x.split(rows)])


# --- dequantize, then a dense matmul: every layer, every token count ------------------------------
def _dense_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype):
    weight = weights.quantized
    offsets, scales = weight.group_offsets().to(dtype).unsqueeze(-1), weight.scales.to(dtype).unsqueeze(-1)
    return weight, offsets, scales  # offsets / scales [N, G, 1]


def _dense_run(x: torch.Tensor, spec: LinearSpec, operands) -> torch.Tensor:
    weight, offsets, scales = operands
    if x.dtype == torch.bfloat16 and native_has("quant"):  # one native pass instead of unpack, multiply, add
        stored_offsets = weight.offsets if weight.offsets is not None else torch.empty(0)
        dense = quant_ops().dequantize_bf16(weight.qweight, weight.scales, stored_offsets, spec.bits, spec.in_features)
        return F.linear(x, dense)
    rows, groups = scales.shape[0], scales.shape[1]
    if spec.bits == 4:  # unpack straight into the output dtype: two strided writes, no int temporaries
        dense = torch.empty(rows, spec.in_features // 2, 2, dtype=x.dtype)
        dense[..., 0] = weight.qweight & 0x0F
        dense[..., 1] = weight.qweight >> 4
    else:
        dense = weight.qweight.to(x.dtype)
    dense = dense.view(rows, groups, -1).mul_(scales).add_(offsets).view(rows, spec.in_features)
    return F.linear(x, dense)


DEQUANT_DENSE = LinearKernel("dequant_dense", WEIGHT_ONLY_KINDS, lambda spec, dtype: None, _dense_prepare,
                             _dense_run)


# --- int8, torch._weight_int8pack_mm ---------------------------------------------------------------
def _int8_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    # the bf16 path gives wrong results when K is not a multiple of 16 (measured on torch 2.13)
    return require((spec.bits == 8, "8-bit weights only"), (dtype in HALF_DTYPES, f"no {dtype} activations"),
                   (dtype != torch.bfloat16 or spec.in_features % 16 == 0, "bfloat16 needs K % 16 == 0"))


INT8_WEIGHT_ONLY = LinearKernel(
    "int8_weight_only", WEIGHT_ONLY_KINDS, _int8_check,
    lambda spec, w, dtype: (w.quantized.qweight.contiguous(), w.quantized.scales.view(-1).to(dtype).contiguous()),
    lambda x, spec, ops: torch._weight_int8pack_mm(x.contiguous(), *ops),
    max_tokens=lambda spec: INT8_MAX_TOKENS, native=lambda spec, ops: (list(ops), 0))  # the same ATen op


# --- int8 per channel, few tokens: native GEMV with the scale applied to the sum -------------------
def _gemv_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((spec.bits == 8 and spec.per_channel, "8-bit per-channel weights only"),
                   (dtype == torch.bfloat16, "bfloat16 activations only"), (spec.in_features % 32 == 0, "needs K % 32 == 0"),
                   (native_has("quant", "avx512_bf16"), "no AVX512-BF16 in the native build here"))


def _gemv_run(x: torch.Tensor, spec: LinearSpec, operands) -> torch.Tensor:
    codes, scales = operands
    ops = quant_ops()
    return in_row_chunks(x, ops.max_gemv_tokens, lambda rows: ops.int8_gemv(rows, codes, scales))


INT8_GEMV = LinearKernel(
    "int8_gemv", WEIGHT_ONLY_KINDS, _gemv_check,
    lambda spec, w, dtype: (w.quantized.qweight, w.quantized.scales.view(-1).float().contiguous()), _gemv_run,
    max_tokens=lambda spec: quant_ops().max_gemv_tokens, native=lambda spec, ops: (list(ops), 0))


# --- int8 per channel, batched calls: codes widened to bfloat16 per panel, vdpbf16ps ----------------
def _panels_requirements(spec: LinearSpec, dtype: torch.dtype) -> tuple[tuple[bool, str], ...]:
    """What both dpbf16 kernels need besides their weight format."""
    return ((dtype == torch.bfloat16, "bfloat16 activations only"),
            (spec.in_features % 32 == 0 and spec.out_features % 16 == 0, "needs K % 32 == 0 and N % 16 == 0"),
            (native_has("quant", "avx512_bf16"), "no AVX512-BF16 in the native build here"),
            (not native_has("quant", "amx"), "AMX tiles run these calls here (woq_amx, dequant_dense)"))


def _by_blocks(t: torch.Tensor) -> torch.Tensor:
    """[N, C, ...] -> [N / 16, C, 16, ...]: per 16-channel block, column c of every channel together."""
    return t.view(t.shape[0] // 16, 16, *t.shape[1:]).transpose(1, 2).contiguous()


def _dpbf16_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((spec.bits == 8 and spec.per_channel, "8-bit per-channel weights only"),
                   *_panels_requirements(spec, dtype))


def _dpbf16_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype):
    codes = weights.quantized.qweight  # int8 [N, K]
    by_pairs = _by_blocks(codes.view(codes.shape[0], -1, 2))  # [N / 16, K / 2, 16, 2]
    return by_pairs, weights.quantized.scales.view(-1).float().contiguous()


INT8_DPBF16 = LinearKernel(
    "int8_dpbf16", WEIGHT_ONLY_KINDS, _dpbf16_check, _dpbf16_prepare,
    lambda x, spec, ops: quant_ops().int8_linear_dpbf16(x, *ops), native=lambda spec, ops: (list(ops), 0))


# --- int4 groups, batched calls: each panel dequantized to bfloat16 once per call, vdpbf16ps ---------
def _int4_dpbf16_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((spec.bits == 4, "4-bit weights only"), (spec.group_len % 2 == 0, "needs an even group length"),
                   *_panels_requirements(spec, dtype))


def _int4_dpbf16_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype):
    weight = weights.quantized  # qweight uint8 [N, K / 2]: byte j holds k = 2j (low nibble) and 2j + 1
    operands = (_by_blocks(weight.qweight), _by_blocks(weight.scales.float()),
                _by_blocks(weight.group_offsets().float()), spec.group_len)
    if weights.channel_index is None:
        return operands
    # the kept columns' values, codes' part plus float part rounded once, replace their columns in each panel
    index = weights.channel_index.long().contiguous()
    codes_part = dequantize_codes(weight.codes(), weight.scales, weight.group_offsets(), spec.in_features)[:, index]
    columns = (codes_part + weights.channel_weight.float()).to(torch.bfloat16)  # [N, C]
    return (*operands, index, _by_blocks(columns))


def _int4_dpbf16_native(spec: LinearSpec, ops) -> tuple[list[torch.Tensor], int]:
    return [*ops[:3], *ops[4:]], ops[3]


INT4_DPBF16 = LinearKernel(
    "int4_dpbf16", WEIGHT_ONLY_KINDS, _int4_dpbf16_check, _int4_dpbf16_prepare,
    lambda x, spec, ops: quant_ops().int4_linear_dpbf16(x, *ops), fuses_channels=True, native=_int4_dpbf16_native)


# --- int4, torch._weight_int4pack_mm_for_cpu --------------------------------------------------------
def _int4_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((spec.bits == 4, "4-bit weights only"), (spec.group_len in (32, 64, 128, 256), "group length"),
                   (dtype in HALF_DTYPES, f"no {dtype} activations"))


def _int4_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype):
    weight = weights.quantized
    packed = torch._convert_weight_to_int4pack_for_cpu(weight.codes().to(torch.int32), 1)
    # the kernel computes (q - 8) * scale + zero, so zero = offset + 8 * scale
    zero = weight.group_offsets() + 8 * weight.scales
    scale_zero = torch.stack((weight.scales, zero), dim=-1).transpose(0, 1)  # [groups, N, 2]
    return packed, spec.group_len, scale_zero.to(dtype).contiguous()


INT4_WEIGHT_ONLY = LinearKernel(
    "int4_weight_only", WEIGHT_ONLY_KINDS, _int4_check, _int4_prepare,
    lambda x, spec, ops: torch._weight_int4pack_mm_for_cpu(x.contiguous(), *ops),
    max_tokens=lambda spec: INT4_MAX_TOKENS, native=lambda spec, ops: ([ops[0], ops[2]], ops[1]))  # the same ATen op


# --- AMX-BF16 tiles dequantized on the fly (bfloat16 activations) -----------------------------------
def _woq_amx_check(spec: LinearSpec, dtype: torch.dtype) -> str | None:
    return require((dtype == torch.bfloat16, "bfloat16 activations only"),
                   (spec.out_features % TILE_N == 0 and spec.in_features % TILE_K_BF16 == 0
                    and spec.group_len % TILE_K_BF16 == 0, "needs N % 16 == 0, K and the group length % 32 == 0"),
                   (native_has("quant", "amx"), "no AMX-BF16 tiles here (or EMBER_DISABLE_AMX=1)"))


def _woq_amx_prepare(spec: LinearSpec, weights: LinearWeights, dtype: torch.dtype):
    weight = weights.quantized
    return tile_woq_codes(weight.qweight, spec.bits), tile_params(weight.scales), tile_params(weight.group_offsets())


WOQ_AMX = LinearKernel(
    "woq_amx", WEIGHT_ONLY_KINDS, _woq_amx_check, _woq_amx_prepare,
    lambda x, spec, ops: quant_ops().woq_linear_amx(x, *ops, spec.bits, spec.out_features),
    max_tokens=lambda spec: WOQ_AMX_MAX_TOKENS)

# Beside a batched kernel (woq_amx with AMX, int8_dpbf16 / int4_dpbf16 without) the packed kernels keep only
# calls of up to KernelPolicy.max_packed_tokens tokens (registry.py)
WEIGHT_ONLY_KERNELS = (INT8_GEMV, INT4_WEIGHT_ONLY, WOQ_AMX, INT8_DPBF16, INT4_DPBF16, INT8_WEIGHT_ONLY, DEQUANT_DENSE)

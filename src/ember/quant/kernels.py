"""CPU matmul kernels for quantized linears behind one interface, plus the reference path and the policy."""
from __future__ import annotations

import dataclasses
import functools
import warnings
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.nn.functional as F

from ember.quant import w4a8, w8a8_amx, woq_amx
from ember.quant.native import quant_ops

if TYPE_CHECKING:
    from ember.quant.linear import QuantLinear

Prepared = Any


@dataclasses.dataclass(frozen=True)
class KernelBackend:
    """One way to compute y = x W^T (+ b) for a ``QuantLinear``.

    supports(layer, dtype) -> bool; prepare(layer, dtype) -> packed operands (cached by the layer);
    run(x [M, K], layer, prepared) -> y [M, N] in x's dtype, bias included.
    """

    name: str
    supports: Callable[["QuantLinear", torch.dtype], bool]
    prepare: Callable[["QuantLinear", torch.dtype], Prepared]
    run: Callable[[torch.Tensor, "QuantLinear", Prepared], torch.Tensor]


def _is_w8a8(layer: "QuantLinear") -> bool:
    return layer.act_bits == 8 and layer.scheme.bits == 8


def _add_bias(y: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
    return y if layer.bias is None else y + layer.bias.to(y.dtype)


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


def _w4a8_reference(x: torch.Tensor, layer: "QuantLinear") -> torch.Tensor:
    """sum_g xs[m, g] * (s[n, g] * A[m, n, g] + o[n, g] * Q[m, g]) with A, Q exact integer sums, in float64."""
    weight = layer.quantized_weight()
    group_len = weight.scheme.group_len(layer.in_features)
    codes, x_scale = quantize_per_group(x, group_len)
    rows, groups = x.shape[0], x_scale.shape[1]
    xq = codes.view(rows, groups, group_len).float()
    # products of codes up to 127 * 15 summed over a group stay exact in float32 (below 2^24)
    acc = torch.einsum("mgl,ngl->mng", xq, weight.codes().view(-1, groups, group_len).float()).double()
    sums = xq.sum(dim=2).double()  # [M, G]
    y = (acc * weight.scales.double() + weight.group_offsets().double() * sums.unsqueeze(1))  # [M, N, G]
    return (y * x_scale.double().unsqueeze(1)).sum(dim=2).to(x.dtype)


# --- reference: dequantize then matmul ------------------------------------------------------------
def _reference_run(x: torch.Tensor, layer: "QuantLinear", _prepared: Prepared) -> torch.Tensor:
    """Weight-only: dequantize W to x's dtype and matmul. W8A8: per-token int8 x, exact int products.
    W4A8: int8 x per token and weight group, exact int products per group."""
    if layer.act_bits == 8 and layer.scheme.bits == 4:
        return _add_bias(_w4a8_reference(x, layer), layer)
    weight = layer.quantized_weight()
    if layer.act_bits == 8:
        codes, x_scale = quantize_per_token(x)
        # int8 x int8 products summed in float64 are exact for any practical K
        acc = codes.double() @ weight.codes().double().T  # [M, N]
        y = (acc * x_scale.double() * weight.scales.double().view(1, -1)).to(x.dtype)
    else:
        y = F.linear(x, weight.dequantize(x.dtype))
    return _add_bias(y, layer)


REFERENCE = KernelBackend("reference", lambda layer, dtype: True, lambda layer, dtype: None, _reference_run)


# --- weight-only, many tokens: dequantize in the activation dtype, then a dense matmul ------------
def _dense_prepare(layer: "QuantLinear", dtype: torch.dtype) -> Prepared:
    weight = layer.quantized_weight()
    return weight.group_offsets().to(dtype).unsqueeze(-1), weight.scales.to(dtype).unsqueeze(-1)  # [N, G, 1]


def _dense_run(x: torch.Tensor, layer: "QuantLinear", prepared: Prepared) -> torch.Tensor:
    ops = quant_ops() if x.dtype == torch.bfloat16 else None
    if ops is not None:  # one native pass instead of unpack, multiply and add over the whole weight
        offsets = layer.offsets if layer.offsets is not None else torch.empty(0)
        weight = ops.dequantize_bf16(layer.qweight, layer.scales, offsets, layer.scheme.bits, layer.in_features)
        return _add_bias(F.linear(x, weight), layer)
    offsets, scales = prepared
    rows, groups = scales.shape[0], scales.shape[1]
    if layer.scheme.bits == 4:  # unpack straight into the output dtype: two strided writes, no int temporaries
        weight = torch.empty(rows, layer.in_features // 2, 2, dtype=x.dtype)
        weight[..., 0] = layer.qweight & 0x0F
        weight[..., 1] = layer.qweight >> 4
    else:
        weight = layer.qweight.to(x.dtype)
    weight = weight.view(rows, groups, -1).mul_(scales).add_(offsets).view(rows, layer.in_features)
    return _add_bias(F.linear(x, weight), layer)


DEQUANT_DENSE = KernelBackend("dequant_dense", lambda layer, dtype: layer.act_bits is None, _dense_prepare, _dense_run)


# --- int8 weight-only: torch._weight_int8pack_mm -------------------------------------------------
def _int8_supports(layer: "QuantLinear", dtype: torch.dtype) -> bool:
    if layer.act_bits is not None or layer.scheme.bits != 8 or dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    # the bf16 path gives wrong results when K is not a multiple of 16 (measured on torch 2.13)
    return dtype != torch.bfloat16 or layer.in_features % 16 == 0


def _int8_prepare(layer: "QuantLinear", dtype: torch.dtype) -> Prepared:
    return layer.qweight.contiguous(), layer.scales.view(-1).to(dtype).contiguous()


def _int8_run(x: torch.Tensor, layer: "QuantLinear", prepared: Prepared) -> torch.Tensor:
    weight, scales = prepared
    return _add_bias(torch._weight_int8pack_mm(x.contiguous(), weight, scales), layer)


INT8_WEIGHT_ONLY = KernelBackend("int8_weight_only", _int8_supports, _int8_prepare, _int8_run)


# --- int8 weight-only, per-channel scales, <= 4 tokens: native GEMV (csrc/int8_gemv.cpp) -----------
@functools.cache
def _has_int8_gemv() -> bool:
    ops = quant_ops()
    return ops is not None and bool(ops.has_int8_gemv())


def _gemv_supports(layer: "QuantLinear", dtype: torch.dtype) -> bool:
    return (layer.act_bits is None and layer.scheme.bits == 8 and layer.scales.shape[1] == 1
            and dtype == torch.bfloat16 and layer.in_features % 32 == 0
            and _has_int8_gemv())


GEMV_MAX_TOKENS = 4  # rows per native call


def _in_gemv_calls(x: torch.Tensor, gemv: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """gemv(x) for x of at most ``GEMV_MAX_TOKENS`` rows, else over row chunks of that size."""
    if x.shape[0] <= GEMV_MAX_TOKENS:
        return gemv(x)
    return torch.cat([gemv(rows) for rows in x.split(GEMV_MAX_TOKENS)])


def _gemv_run(x: torch.Tensor, layer: "QuantLinear", prepared: Prepared) -> torch.Tensor:
    return _add_bias(_in_gemv_calls(x, lambda rows: quant_ops().int8_gemv(rows, layer.qweight, prepared)), layer)


INT8_GEMV = KernelBackend("int8_gemv", _gemv_supports, lambda layer, dtype: layer.scales.view(-1).float().contiguous(),
                          _gemv_run)


# --- W8A8, <= 4 tokens: native VNNI GEMV of exact int32 sums (csrc/int8_gemv.cpp), then rescale_rows --
@functools.cache
def _has_w8a8_gemv() -> bool:
    ops = quant_ops()
    return ops is not None and bool(ops.has_w8a8_gemv())


def _w8a8_gemv_supports(layer: "QuantLinear", dtype: torch.dtype) -> bool:
    return _is_w8a8(layer) and dtype in (torch.bfloat16, torch.float32) and _has_w8a8_gemv()


def _w8a8_gemv_prepare(layer: "QuantLinear", dtype: torch.dtype) -> Prepared:
    codes = layer.qweight.contiguous()
    return codes, codes.sum(dim=1, dtype=torch.int32), layer.scales.view(-1).float().contiguous()


def _w8a8_gemv_run(x: torch.Tensor, layer: "QuantLinear", prepared: Prepared) -> torch.Tensor:
    codes, colsum, w_scale = prepared
    # one native call per 4 rows: quantize_rows_int8, the GEMV's exact int32 sums, rescale_rows
    return _in_gemv_calls(x, lambda rows: quant_ops().w8a8_linear_gemv(rows, codes, colsum, w_scale, layer.bias))


W8A8_GEMV = KernelBackend("w8a8_gemv", _w8a8_gemv_supports, _w8a8_gemv_prepare, _w8a8_gemv_run)


# --- int4 weight-only: torch._weight_int4pack_mm_for_cpu -----------------------------------------
def _int4_supports(layer: "QuantLinear", dtype: torch.dtype) -> bool:
    return (layer.act_bits is None and layer.scheme.bits == 4
            and layer.scheme.group_len(layer.in_features) in (32, 64, 128, 256)
            and dtype in (torch.bfloat16, torch.float16, torch.float32))


def _int4_prepare(layer: "QuantLinear", dtype: torch.dtype) -> Prepared:
    weight = layer.quantized_weight()
    packed = torch._convert_weight_to_int4pack_for_cpu(weight.codes().to(torch.int32), 1)
    # the kernel computes (q - 8) * scale + zero, so zero = offset + 8 * scale
    zero = weight.group_offsets() + 8 * weight.scales
    scale_zero = torch.stack((weight.scales, zero), dim=-1).transpose(0, 1)  # [groups, N, 2]
    return packed, scale_zero.to(dtype).contiguous(), weight.scheme.group_len(layer.in_features)


def _int4_run(x: torch.Tensor, layer: "QuantLinear", prepared: Prepared) -> torch.Tensor:
    packed, scale_zero, group = prepared
    return _add_bias(torch._weight_int4pack_mm_for_cpu(x.contiguous(), packed, group, scale_zero), layer)


INT4_WEIGHT_ONLY = KernelBackend("int4_weight_only", _int4_supports, _int4_prepare, _int4_run)


# --- W8A8 dynamic: fbgemm linear_dynamic on row-normalised activations (per-token in effect) ---
def _fbgemm_supports(layer: "QuantLinear", dtype: torch.dtype) -> bool:
    return (_is_w8a8(layer) and hasattr(torch.ops.quantized, "linear_dynamic")
            and "fbgemm" in torch.backends.quantized.supported_engines)


def _fbgemm_prepare(layer: "QuantLinear", dtype: torch.dtype) -> Prepared:
    weight = layer.quantized_weight()
    with warnings.catch_warnings():  # the eager quantized-tensor API is deprecated upstream
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(
            weight.codes().to(torch.int8), weight.scales.view(-1).double(),
            torch.zeros(layer.out_features, dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qweight, None)  # bias added after the row rescale


def _fbgemm_run(x: torch.Tensor, layer: "QuantLinear", prepared: Prepared) -> torch.Tensor:
    # fbgemm quantizes activations per tensor; one token with massive activations (attention-sink
    # tokens reach hundreds) would crush every other row. Normalising each row to max|x| = 1 first
    # makes the per-tensor range the per-token one; the row scale is applied to the output.
    xf = x.float()
    if xf.shape[0] == 1:  # one token: per tensor is per token already (decode fast path)
        return _add_bias(torch.ops.quantized.linear_dynamic(xf.contiguous(), prepared, False), layer).to(x.dtype)
    row_scale = xf.abs().amax(dim=1, keepdim=True).clamp(min=1e-8)  # [M, 1]
    y = torch.ops.quantized.linear_dynamic((xf / row_scale).contiguous(), prepared, False) * row_scale
    return _add_bias(y, layer).to(x.dtype)


FBGEMM_W8A8 = KernelBackend("fbgemm_w8a8", _fbgemm_supports, _fbgemm_prepare, _fbgemm_run)


# --- W8A8 dynamic: torch._int_mm with per-token int8 activations ---------------------------------
def _int_mm_prepare(layer: "QuantLinear", dtype: torch.dtype) -> Prepared:
    return layer.qweight.t().contiguous(), layer.scales.view(1, -1).float()  # [K, N], [1, N]


# oneDNN's int8 matmuls fall off a cliff for tall inputs: 4096x576 @ 576x3072 took 92 ms against
# 1.7 ms for 1024 rows (2 threads, unpacked weight); row chunks of 1024 keep them on the fast path.
INT_MM_MAX_ROWS = 1024


def _w8a8_in_chunks(codes: torch.Tensor, x_scale: torch.Tensor, matmul: Callable[[torch.Tensor], torch.Tensor],
                    w_scale: torch.Tensor, layer: "QuantLinear", dtype: torch.dtype) -> torch.Tensor:
    """matmul(codes) rescaled per row (native pass), in chunks of ``INT_MM_MAX_ROWS`` rows.

    Rescaling chunk by chunk also keeps a whole prefill's float32/int32 [M, N] from being allocated
    (its page faults cost more than the rescale).
    """
    ops = quant_ops()
    outs = [ops.rescale_rows(matmul(rows), scale, w_scale, layer.bias, dtype)
            for rows, scale in zip(codes.split(INT_MM_MAX_ROWS), x_scale.split(INT_MM_MAX_ROWS))]
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _int_mm_run(x: torch.Tensor, layer: "QuantLinear", prepared: Prepared) -> torch.Tensor:
    weight_t, w_scale = prepared
    if quant_ops() is not None and x.dtype in (torch.bfloat16, torch.float32):
        codes, x_scale = quant_ops().quantize_rows_int8(x)
        return _w8a8_in_chunks(codes, x_scale, lambda rows: torch._int_mm(rows, weight_t), w_scale, layer, x.dtype)
    codes, x_scale = quantize_per_token(x)
    acc = torch.cat([torch._int_mm(rows, weight_t) for rows in codes.split(INT_MM_MAX_ROWS)])  # int32 [M, N]
    return _add_bias((acc.float() * x_scale * w_scale).to(x.dtype), layer)


INT_MM_W8A8 = KernelBackend("int_mm_w8a8", lambda layer, dtype: _is_w8a8(layer), _int_mm_prepare, _int_mm_run)

# --- W8A8 dynamic: oneDNN u8 x s8 matmul on a prepacked weight (AMX-INT8 or VNNI) -----------------
def _onednn_supports(layer: "QuantLinear", dtype: torch.dtype) -> bool:
    return (_is_w8a8(layer) and dtype in (torch.bfloat16, torch.float32) and quant_ops() is not None
            and hasattr(torch.ops.onednn, "qlinear_prepack") and torch.backends.mkldnn.is_available())


def _onednn_prepare(layer: "QuantLinear", dtype: torch.dtype) -> Prepared:
    packed = torch.ops.onednn.qlinear_prepack(layer.qweight.contiguous(), None)
    w_scale = layer.scales.view(-1).float().contiguous()
    return packed, w_scale, torch.zeros_like(w_scale, dtype=torch.long), torch.ones_like(w_scale)


def _onednn_run(x: torch.Tensor, layer: "QuantLinear", prepared: Prepared) -> torch.Tensor:
    packed, w_scale, w_zero, ones = prepared
    # per-token codes shifted to uint8 (zero point 128); oneDNN's activation scale is per tensor, so it
    # gets 1 and the row scales are applied to its float32 output (= integer products * weight scale)
    codes, x_scale = quant_ops().quantize_rows_int8(x, shift128=True)

    def matmul(rows: torch.Tensor) -> torch.Tensor:
        return torch.ops.onednn.qlinear_pointwise(rows, 1.0, 128, packed, w_scale, w_zero, None, 1.0, 0,
                                                  torch.float32, "none", [], "")

    return _w8a8_in_chunks(codes, x_scale, matmul, ones, layer, x.dtype)


ONEDNN_W8A8 = KernelBackend("onednn_w8a8", _onednn_supports, _onednn_prepare, _onednn_run)

# --- weight-only, many tokens, bf16: AMX tiles dequantized on the fly (csrc/woq_amx.cpp) ------------
WOQ_AMX = KernelBackend("woq_amx", woq_amx.supports, woq_amx.prepare,
                        lambda x, layer, prepared: _add_bias(woq_amx.run(x, layer, prepared), layer))

# --- W8A8, CPU with AMX-INT8: int8 tile products with the rescale fused into the store (csrc/w8a8_amx.cpp)
W8A8_AMX = KernelBackend("w8a8_amx", w8a8_amx.supports, w8a8_amx.prepare, w8a8_amx.run)

# --- W4A8: per-block int8 activations x 4-bit codes on AVX512-VNNI, per-group rescale (csrc/w4a8_vnni.cpp)
W4A8_VNNI = KernelBackend("w4a8_vnni", w4a8.supports, w4a8.prepare, w4a8.run)

KERNEL_REGISTRY: dict[str, KernelBackend] = {
    k.name: k for k in (REFERENCE, DEQUANT_DENSE, INT8_WEIGHT_ONLY, INT8_GEMV, INT4_WEIGHT_ONLY, W8A8_GEMV, FBGEMM_W8A8,
                        INT_MM_W8A8, ONEDNN_W8A8, WOQ_AMX, W8A8_AMX, W4A8_VNNI)
}


@dataclasses.dataclass(frozen=True)
class KernelPolicy:
    """Which kernel a ``QuantLinear`` uses for a call, by scheme, activation dtype and token count.

    Args:
        kernel: force one registered kernel ("auto" picks by the rules below; an unsupported forced
            kernel falls back to the reference path).
        max_int4_tokens / max_int8_tokens: the weight-only packed kernels are used up to this many
            tokens; beyond (prefill) the weight is dequantized per call and a dense bf16 matmul
            runs. Measured break-even on this CPU (1 thread, 576x1536, bf16): ~48 and ~16 tokens.
        packed_dtypes: activation dtypes for which the weight-only packed kernels are used
            (measured: with float32 activations the int4 kernel is 20-100x slower than dense).
        max_fbgemm_tokens: W8A8 uses ``w8a8_order`` up to this many tokens, ``w8a8_batched_order``
            beyond. Measured (1 thread, 576x1536): fbgemm 0.024 ms at 1 token against 0.09 for
            ``torch._int_mm``; at 64 tokens 0.23 against 0.09, at 1024 3.7 against 1.0-1.7. oneDNN
            on a prepacked weight (2 threads, 576x3072): 0.11 ms at 64 tokens and 1.09 at 1024,
            against 0.17 / 2.03 for ``_int_mm`` and 0.15 / 1.28 for the prepacked bf16 matmul.
            fbgemm against oneDNN per SmolLM2 decoder layer (4 linears, 2 threads): 0.15 / 0.27 ms
            at 1 token, 0.31 / 0.32 at 8, 0.32 / 0.31 at 10, 0.43 / 0.34 at 16, 0.68 / 0.39 at 32.
        w8a8_order / w8a8_batched_order: W8A8 kernels in order of preference (the first supported
            one runs); ``w8a8_decode_order`` replaces ``w8a8_order`` up to ``max_gemv_tokens`` tokens.
            ``w8a8_gemv`` (AVX512-VNNI, no AMX) per 30 SmolLM2 layers at 1 token on a Zen 4: 6.5 ms
            against 9.1-11.9 for fbgemm and 14.3 for oneDNN. ``w8a8_amx`` (CPUs with AMX-INT8) beats
            the others at every size, per SmolLM2 decoder layer (2 threads): 0.095 ms at 1 token
            (fbgemm 0.15), 0.23 at 64 (oneDNN 0.57), 2.35 at 1024 (oneDNN 3.78); the prepacked bf16
            matmuls take 0.25 / 0.37 / 4.06.
        weight_only_batched_order: weight-only kernels beyond the packed-kernel limits, in order of
            preference (the first supported one runs; ``dequant_dense`` supports every layer).
            Measured per SmolLM2 decoder layer (2 threads, bf16, int8 / int4 g32): ``woq_amx`` 0.33 /
            0.31 ms at 16 tokens (0.15-0.19 since its one-block-per-task path for up to 64 tokens)
            against 0.78 / 1.15 for ``dequant_dense``, 1.28 / 1.23 against 1.76 / 2.11 at 256, and
            within noise of it at 1024 (4.5-4.8 ms both).
        max_packed_tokens_amx: where ``woq_amx`` runs the batched calls, the packed kernels keep
            only this many tokens. Per SmolLM2 decoder layer (2 threads, int4 g64 / g32 and int8): the
            packed kernels take 0.11-0.12 ms at 1 token, 0.19-0.21 at 4 and 0.36-0.41 at 6, against a
            flat 0.18-0.22 for ``woq_amx`` up to 16 tokens.
        max_woq_amx_tokens: ``woq_amx`` runs calls up to this many tokens; longer ones (a whole prefill
            step) take the next kernel of ``weight_only_batched_order``. Measured per SmolLM2 decoder
            layer (2 threads, int8): ``woq_amx`` 4.4 ms at 1024 tokens against 4.7 for ``dequant_dense``
            and 4.1 for bf16; at 2048, 12.1 against 6.4 and 5.7; at 4096, 25.2 against 13.0 and 12.4.
        w4a8_order: W4A8 kernels (4-bit weights, int8 activations per token and weight group) in order
            of preference; every call of such a layer takes the first supported one (the reference at
            worst), so a request's numerics do not depend on how its tokens were batched. Per SmolLM2
            decoder layer (2 threads, ``w4a8_vnni`` g64 / bf16 / int4 g64 weight-only, ms): without AMX (a
            Xeon run with EMBER_DISABLE_AMX=1, ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16) 0.053 / 0.154 / 0.108
            at 1 token, 0.46 / 1.92 / 1.92 at 48, 8.7 / 32.2 / 34.3 at 1024; with AMX 0.050 / 0.189 /
            0.108 at 1, 0.45 / 0.24 / 0.26 at 48, 9.4 / 4.3 / 3.5 at 1024.
        max_gemv_tokens: int8 weight-only calls with per-channel scales up to this many tokens run
            ``int8_gemv`` (the kernel takes at most 4). 30 decoder layers whose codes come from memory
            (2 threads, 1 token): 5.7-6.1 ms against 10.8 for ``torch._weight_int8pack_mm`` on a Xeon,
            5.5 against 9.3 on a Zen 4 (10.7 against 13.6 at 4 tokens); one layer in cache: 0.11 /
            0.12 ms at 1 token, 0.17 / 0.21 at 4.
    """

    kernel: str = "auto"
    max_int4_tokens: int = 48
    max_int8_tokens: int = 16
    max_fbgemm_tokens: int = 8
    packed_dtypes: tuple[torch.dtype, ...] = (torch.bfloat16,)
    w8a8_order: tuple[str, ...] = ("w8a8_amx", "fbgemm_w8a8", "onednn_w8a8", "int_mm_w8a8")
    w8a8_decode_order: tuple[str, ...] = ("w8a8_amx", "w8a8_gemv", "fbgemm_w8a8", "onednn_w8a8", "int_mm_w8a8")
    w8a8_batched_order: tuple[str, ...] = ("w8a8_amx", "onednn_w8a8", "int_mm_w8a8")
    weight_only_batched_order: tuple[str, ...] = ("woq_amx", "dequant_dense")
    w4a8_order: tuple[str, ...] = ("w4a8_vnni",)
    max_packed_tokens_amx: int = 4
    max_woq_amx_tokens: int = 1024
    max_gemv_tokens: int = 4

    def __post_init__(self) -> None:
        unknown = {self.kernel} - {"auto"} | set(self.w8a8_order + self.w8a8_decode_order + self.w8a8_batched_order
                                                  + self.weight_only_batched_order + self.w4a8_order)
        unknown -= set(KERNEL_REGISTRY)
        if unknown:
            raise ValueError(f"unknown kernels {sorted(unknown)}; known: {sorted(KERNEL_REGISTRY)}")
        if min(self.max_int4_tokens, self.max_int8_tokens, self.max_fbgemm_tokens, self.max_packed_tokens_amx,
               self.max_woq_amx_tokens, self.max_gemv_tokens) < 0:
            raise ValueError("token limits must be >= 0")

    def select(self, layer: "QuantLinear", num_tokens: int, dtype: torch.dtype) -> KernelBackend:
        """The kernel for this call; always returns a supported one (the reference at worst)."""
        if self.kernel != "auto":
            forced = KERNEL_REGISTRY[self.kernel]
            return forced if forced.supports(layer, dtype) else REFERENCE
        if layer.act_bits == 8 and layer.scheme.bits == 4:
            return self._first_supported(self.w4a8_order, layer, dtype)
        if layer.act_bits == 8:
            if num_tokens <= min(self.max_gemv_tokens, GEMV_MAX_TOKENS):
                order = self.w8a8_decode_order
            else:
                order = self.w8a8_order if num_tokens <= self.max_fbgemm_tokens else self.w8a8_batched_order
            return self._first_supported(order, layer, dtype)
        if num_tokens <= min(self.max_gemv_tokens, GEMV_MAX_TOKENS) and INT8_GEMV.supports(layer, dtype):
            return INT8_GEMV
        packed = INT4_WEIGHT_ONLY if layer.scheme.bits == 4 else INT8_WEIGHT_ONLY
        limit = self.max_int4_tokens if layer.scheme.bits == 4 else self.max_int8_tokens
        order = self.weight_only_batched_order
        if num_tokens > self.max_woq_amx_tokens:
            order = tuple(name for name in order if name != WOQ_AMX.name)
        batched = self._first_supported(order, layer, dtype)
        if batched is WOQ_AMX:
            limit = min(limit, self.max_packed_tokens_amx)
        if num_tokens <= limit and dtype in self.packed_dtypes and packed.supports(layer, dtype):
            return packed
        return batched

    @staticmethod
    def _first_supported(order: tuple[str, ...], layer: "QuantLinear", dtype: torch.dtype) -> KernelBackend:
        return next((KERNEL_REGISTRY[name] for name in order if KERNEL_REGISTRY[name].supports(layer, dtype)),
                    REFERENCE)

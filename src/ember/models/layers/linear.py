"""Linear layers with weights prepacked for oneDNN (bfloat16 inference on CPU)."""

from __future__ import annotations

import torch
from torch import nn

# oneDNN picks the packed layout for this many rows; measured on this model's shapes, one
# layout packed for 64 rows serves 1..1024 rows within noise of the best layout for each.
PACK_BATCH_HINT = 64


def can_prepack(dtype: torch.dtype) -> bool:
    """oneDNN prepacking pays for bfloat16; float32 stays on the reference path (bit-exact)."""
    return (dtype == torch.bfloat16 and torch.backends.mkldnn.is_available()
            and torch.ops.mkldnn._is_mkldnn_bf16_supported())


# Calls up to this many tokens run the AMX tile kernel where the CPU has AMX (`quant/csrc/bf16_amx.cpp`).
# Measured per SmolLM2 decoder layer (4 linears, 2 threads, ms, oneDNN / AMX tiles): 0.24 / 0.16 at
# 1 token, 0.25 / 0.15 at 16, 0.38 / 0.26 at 64, 0.56 / 0.48 at 128, 0.95 / 0.89 at 256, level at 1024.
# The 49152-row LM head gains only up to ~32 tokens (1.23 / 1.03 ms at 1, 1.38 / 1.19 at 16, 2.02 /
# 2.22 at 64).
AMX_MAX_TOKENS = 256
AMX_MAX_TOKENS_WIDE = 32
WIDE_OUT_FEATURES = 16384


def tile_bf16_weight(weight: torch.Tensor) -> torch.Tensor:
    """bf16 [N, K] -> [N / 16, K / 32, 16, 32]: one AMX B tile contiguous, row r holding k values 2r
    and 2r + 1 of each of the 16 columns (the VNNI pair layout of ``tdpbf16ps``). Same size."""
    from ember.quant.amx import b_tiles

    return b_tiles(weight.to(torch.bfloat16), 2)


# Calls up to this many tokens run the AVX512-BF16 GEMV (`quant/csrc/bf16_gemv.cpp`) on the row-major
# weight where there is no AMX: a decode step streams the weights, and oneDNN's small-row kernel reads
# them at 12-16 GB/s with 2 threads on a Zen 4, the GEMV at 25-30 (as fast as a plain read of them).
GEMV_MAX_TOKENS = 4


def _amx_ops():
    """The native module when it can run the bf16 AMX kernel here, else None."""
    from ember.quant.amx import has_amx
    from ember.quant.native import quant_ops

    return quant_ops() if has_amx() else None


def _gemv_ops():
    """The native module when it can run the bf16 GEMV here, else None."""
    from ember.quant.native import quant_ops

    ops = quant_ops()
    return ops if ops is not None and ops.has_bf16_gemv() else None


class PrepackedLinear(nn.Module):
    """`y = x @ W^T` with W reordered once into oneDNN's blocked layout.

    A plain `F.linear` re-reads the row-major weight and reorders it inside every call; at one
    token that costs 2-4x the matmul itself. Inference only: the packed weight is opaque. Short calls
    (decode steps) run a native kernel on a second copy of W, which doubles the layer's weight memory:
    on CPUs with AMX a tile kernel on a tile-ordered copy (oneDNN's per-call work dominates there),
    elsewhere, for up to `GEMV_MAX_TOKENS` tokens, an AVX512-BF16 GEMV on the row-major weight.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PrepackedLinear supports bias-free layers only")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        weight = linear.weight.detach()
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight, PACK_BATCH_HINT)
        self._ops = _amx_ops() if self.out_features % 16 == 0 and self.in_features % 32 == 0 else None
        self.tiled_weight = tile_bf16_weight(weight) if self._ops is not None else None
        self.amx_max_tokens = AMX_MAX_TOKENS_WIDE if self.out_features >= WIDE_OUT_FEATURES else AMX_MAX_TOKENS
        self._gemv = None
        if self._ops is None and self.in_features % 32 == 0:
            self._gemv = _gemv_ops()
        self.weight_rows = weight.to(torch.bfloat16).contiguous() if self._gemv is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16 and (self.tiled_weight is not None or self.weight_rows is not None):
            num_tokens = x.numel() // self.in_features
            if self.tiled_weight is not None and num_tokens <= self.amx_max_tokens:
                out = self._ops.bf16_linear_amx(x.reshape(num_tokens, self.in_features), self.tiled_weight,
                                                self.out_features)
                return out.view(*x.shape[:-1], self.out_features)
            if self.weight_rows is not None and num_tokens <= GEMV_MAX_TOKENS:
                out = self._gemv.bf16_gemv(x.reshape(num_tokens, self.in_features), self.weight_rows)
                return out.view(*x.shape[:-1], self.out_features)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, None, "none", [], "")

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, prepacked"


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One layer stacking the outputs of linears that share an input, or None if they cannot be fused.

    Float bias-free `nn.Linear`s concatenate their weights; quantized linears of one scheme
    concatenate codes and scales (`QuantLinear.concat`); anything else (mixed kinds, already
    prepacked) keeps its own kernels.
    """
    from ember.quant.linear import QuantLinear

    if all(type(m) is nn.Linear and m.bias is None for m in linears):
        weight = torch.cat([m.weight for m in linears])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        return fused
    if all(type(m) is QuantLinear for m in linears):
        try:
            return QuantLinear.concat(linears)
        except ValueError:  # mixed schemes (a mixed-precision plan): keep them apart
            return None
    return None


def prepack_linears(model: nn.Module) -> int:
    """Replace every bias-free `nn.Linear` of `model` by a `PrepackedLinear`; returns the count."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and child.bias is None:
                setattr(parent, name, PrepackedLinear(child))
                count += 1
    return count

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


class PrepackedLinear(nn.Module):
    """`y = x @ W^T` with W reordered once into oneDNN's blocked layout.

    A plain `F.linear` re-reads the row-major weight and reorders it inside every call; at one
    token that costs 2-4x the matmul itself. Inference only: the packed weight is opaque.
    """

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        if linear.bias is not None:
            raise ValueError("PrepackedLinear supports bias-free layers only")
        self.in_features = linear.in_features
        self.out_features = linear.out_features
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), PACK_BATCH_HINT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
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

"""``DenseLinear`` (float weights through the kernel dispatch), fusing linears that share an input, and
swapping a model's float linears for it."""

from __future__ import annotations

import torch
from torch import nn

from ember.kernels.linear.base import LinearWeights
from ember.kernels.linear.module import KernelLinear
from ember.kernels.linear.registry import KernelPolicy
from ember.kernels.linear.spec import LinearSpec
from ember.quant.linear import QuantLinear


class DenseLinear(KernelLinear):
    """`y = x @ W^T (+ b)` for a float weight, run by the kernel the policy picks per call size.

    Inference only. Kernels derive their own copies of W (oneDNN's blocked layout, AMX tiles) once;
    those copies are what makes short calls fast, and they cost the layer's weight memory again each.
    """

    def __init__(self, linear: nn.Linear, policy: KernelPolicy | None = None) -> None:
        super().__init__(LinearSpec(linear.in_features, linear.out_features, has_bias=linear.bias is not None),
                         policy)
        self.register_buffer("weight", linear.weight.detach())
        if linear.bias is not None:  # added after the matmul by the base class
            self.register_buffer("bias", linear.bias.detach())

    def linear_weights(self) -> LinearWeights:
        return LinearWeights(weight=self.weight)

    def prepare_kernels(self, dtype: torch.dtype) -> None:
        """Build the operands of every kernel the policy may pick for ``dtype`` now, at load, not on the
        first request; raises if a forced kernel cannot run this layer."""
        self.policy.check_forced(self.spec, dtype)
        forced = self.policy.forced_for(self.spec)
        kernels = [forced] if forced is not None else self.policy.candidates(self.spec.kind)
        for kernel in kernels:
            if kernel.supports(self.spec, dtype):
                self.prepare(kernel, dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def fuse_linears(linears: list[nn.Module]) -> nn.Module | None:
    """One layer stacking the outputs of linears that share an input, or None if they cannot be fused.

    Float `nn.Linear`s concatenate their weights (and biases, when all have one); quantized linears
    of one scheme concatenate codes and scales (`QuantLinear.concat`); anything else (mixed kinds,
    some biased and some not, already dispatched) keeps its own kernels.
    """
    if all(type(m) is nn.Linear for m in linears):
        biased = {m.bias is not None for m in linears}
        if len(biased) > 1:
            return None
        weight = torch.cat([m.weight for m in linears])
        fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
        fused.weight = nn.Parameter(weight, requires_grad=False)
        if biased == {True}:
            fused.bias = nn.Parameter(torch.cat([m.bias for m in linears]), requires_grad=False)
        return fused
    if all(type(m) is QuantLinear for m in linears):
        try:
            return QuantLinear.concat(linears)
        except ValueError:  # mixed schemes (a mixed-precision plan): keep them apart
            return None
    return None


def should_fuse_projections(dtype: torch.dtype) -> bool:
    """q/k/v and gate/up are fused in bfloat16 (one matmul each instead of three and two); float32 keeps
    the reference's separate matmuls, bit for bit."""
    return dtype == torch.bfloat16


def use_dense_kernels(model: nn.Module, dtype: torch.dtype, policy: KernelPolicy | None = None) -> int:
    """Replace every `nn.Linear` of `model` by a `DenseLinear` whose kernels are prepared for `dtype`;
    quantized layers get `policy` too. Returns the count of replaced linears."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                layer = DenseLinear(child, policy)
                layer.prepare_kernels(dtype)
                setattr(parent, name, layer)
                count += 1
            elif isinstance(child, QuantLinear) and policy is not None:
                child.policy = policy
                child.policy.check_forced(child.spec, dtype)
    return count

"""``KernelLinear``: the base of every linear module that runs through the kernel dispatch.

Subclasses own the tensors (a float weight, or packed codes and scales) and describe them as a
``LinearSpec`` and ``LinearWeights``; this base owns the policy, the per-call-size kernel choice and
each kernel's prepared operands.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ember.kernels.linear.base import LinearKernel, LinearWeights
from ember.kernels.linear.registry import KernelPolicy
from ember.kernels.linear.spec import LinearSpec

# Plans are kept for calls of up to this many tokens. Choosing costs ~7 µs, against ~0.4 ms for the
# smallest linear of the bundled model at 257 tokens (docs/reliability.md), and a server's prompt steps
# bring a new token count nearly every step: cached, every count up to the step budget would stay.
PLAN_CACHE_MAX_TOKENS = 256


class KernelLinear(nn.Module):
    """y = x W^T (+ b) computed by the kernel ``policy`` picks for each call's token count and dtype.

    The choice and its operands are cached per (token count, dtype) for calls of up to
    ``PLAN_CACHE_MAX_TOKENS`` tokens: choosing costs more than a small call's matmul. Caches are dropped
    when the policy is replaced, the weights are loaded or the module is moved.
    """

    def __init__(self, spec: LinearSpec, policy: KernelPolicy | None = None) -> None:
        super().__init__()
        self.spec = spec  # frozen: what the kernels are told about this layer
        self.in_features, self.out_features = spec.in_features, spec.out_features
        self.policy = policy or KernelPolicy()
        self.register_buffer("bias", None)  # subclasses with a bias register theirs
        self._prepared: dict[tuple[str, torch.dtype], Any] = {}
        self._plans: dict[tuple[int, torch.dtype], tuple[LinearKernel, Any, bool]] = {}
        self._plans_policy: KernelPolicy | None = None

    def linear_weights(self) -> LinearWeights:
        """The tensors a kernel's prepare() packs (subclasses hold them)."""
        raise NotImplementedError

    def select_kernel(self, num_tokens: int, dtype: torch.dtype) -> LinearKernel:
        return self.policy.select(self.spec, num_tokens, dtype)

    def prepare(self, kernel: LinearKernel, dtype: torch.dtype) -> Any:
        """Operands of ``kernel`` for activations of ``dtype`` (built once, then cached)."""
        key = (kernel.name, dtype)
        if key not in self._prepared:
            self._prepared[key] = kernel.prepare(self.spec, self.linear_weights(), dtype)
        return self._prepared[key]

    def run_kernel(self, x: torch.Tensor, kernel: LinearKernel) -> torch.Tensor:
        """Apply one specific kernel to x [..., K] (tests and benchmarks), whatever the policy says."""
        flat = x.reshape(-1, self.in_features)  # [num_tokens, K]
        out = kernel.run(flat, self.spec, self.prepare(kernel, x.dtype))
        if self.bias is not None and not kernel.fuses_bias:
            out = out + self.bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the per-call path of every linear: a decode step makes ~200 of these calls, so nothing here
        # that a cached plan can answer (a 2-D input is passed through without reshapes)
        num_tokens = x.numel() // self.in_features
        kernel, operands, add_bias = self._cached_plan(num_tokens, x.dtype)
        flat = x.dim() == 2
        out = kernel.run(x if flat else x.reshape(num_tokens, self.in_features), self.spec, operands)
        if add_bias:
            out = out + self.bias.to(out.dtype)
        return out if flat else out.reshape(*x.shape[:-1], self.out_features)

    def native_call(self, num_tokens: int, dtype: torch.dtype) -> tuple[str, list[torch.Tensor], int] | None:
        """What the native decode loop passes for this layer's calls of ``num_tokens`` rows: (kernel name,
        tensors, integer argument) of the kernel ``forward`` would run; None when that kernel has no native
        entry or a bias is added after it."""
        kernel, operands, add_bias = self._cached_plan(num_tokens, dtype)
        if add_bias or kernel.native is None:
            return None
        tensors, arg = kernel.native(self.spec, operands)
        return kernel.name, tensors, arg

    def _cached_plan(self, num_tokens: int, dtype: torch.dtype) -> tuple[LinearKernel, Any, bool]:
        if self._plans_policy is not self.policy:
            self._plans, self._plans_policy = {}, self.policy
        plan = self._plans.get((num_tokens, dtype))
        if plan is None:
            plan = self._plan(num_tokens, dtype)
            if num_tokens <= PLAN_CACHE_MAX_TOKENS:
                self._plans[(num_tokens, dtype)] = plan
        return plan

    def _plan(self, num_tokens: int, dtype: torch.dtype) -> tuple[LinearKernel, Any, bool]:
        """(kernel, its operands, whether the bias is added after it) for calls of this size and dtype."""
        kernel = self.select_kernel(num_tokens, dtype)
        return kernel, self.prepare(kernel, dtype), self.bias is not None and not kernel.fuses_bias

    def clear_kernel_caches(self) -> None:
        # new dicts, not cleared ones: the native decode loop witnesses `_plans` by identity, which also
        # covers the calls too large to be cached there
        self._prepared, self._plans = {}, {}

    def _apply(self, fn: Any, recurse: bool = True) -> "KernelLinear":
        super()._apply(fn, recurse)
        self.clear_kernel_caches()  # operands describe the old tensors
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self.clear_kernel_caches()
        super()._load_from_state_dict(*args, **kwargs)

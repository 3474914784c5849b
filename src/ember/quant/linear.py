"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` holding packed integer weights."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ember.quant.kernels import KernelBackend, KernelPolicy
from ember.quant.rtn import QuantizedWeight, WeightScheme


MAX_PLANNED_TOKENS = 64  # calls up to this many tokens reuse their kernel choice


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as integer codes and per-group scales.

    Buffers (the checkpoint layout): ``qweight`` int8 [N, K] (8-bit) or uint8 [N, K // 2] (4-bit,
    two codes per byte); ``scales`` float32 [N, groups]; ``offsets`` float32 [N, groups]
    (asymmetric 4-bit only; w = code * scale + offset); ``bias`` [N] if present. Packed kernel operands are derived from these on first
    use per activation dtype (or by ``prepare``) and are not part of the state dict.

    Args:
        in_features, out_features: as ``nn.Linear``.
        scheme: weight scheme; ``act_bits=8`` adds dynamic int8 activations: per token with 8-bit
            weights (W8A8), per token and weight group with 4-bit ones (W4A8).
        bias: whether the layer has a bias.
        policy: kernel selection policy.
    """

    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme, *,
                 act_bits: int | None = None, bias: bool = False, policy: KernelPolicy | None = None) -> None:
        super().__init__()
        if act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None or 8, got {act_bits}")
        groups = in_features // scheme.group_len(in_features)
        self.in_features, self.out_features = in_features, out_features
        self.scheme, self.act_bits = scheme, act_bits
        self.policy = policy or KernelPolicy()
        if scheme.bits == 4:
            if in_features % 2:
                raise ValueError("4-bit weights need an even in_features")
            self.register_buffer("qweight", torch.zeros(out_features, in_features // 2, dtype=torch.uint8))
        else:
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scales", torch.ones(out_features, groups))
        offsets = None if scheme.symmetric else torch.zeros(out_features, groups)
        self.register_buffer("offsets", offsets)
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._prepared: dict[tuple[str, torch.dtype], Any] = {}
        # (kernel, operands) per (token count, dtype) of decode-sized calls, for the policy it came from:
        # choosing the kernel costs more than a small call's matmul
        self._plans: dict[tuple[int, torch.dtype], tuple[KernelBackend, Any]] = {}
        self._plans_policy: KernelPolicy | None = None

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None, *,
                       act_bits: int | None = None, policy: KernelPolicy | None = None) -> "QuantLinear":
        """Build from a ``QuantizedWeight`` (and the float bias of the replaced linear)."""
        out_features = weight.scales.shape[0]
        layer = cls(weight.in_features, out_features, weight.scheme, act_bits=act_bits,
                    bias=bias is not None, policy=policy)
        layer.qweight.copy_(weight.qweight)
        layer.scales.copy_(weight.scales)
        if weight.offsets is not None:
            layer.offsets.copy_(weight.offsets)
        if bias is not None:
            layer.bias.copy_(bias.detach().float())
        return layer

    @classmethod
    def concat(cls, layers: list["QuantLinear"]) -> "QuantLinear":
        """One layer computing [y_1; y_2; ...] for linears sharing an input (fused q/k/v, gate/up).

        Exact: output rows keep their own codes and scales, and W8A8 activations are quantized per
        token, the same for every part. Raises ValueError if schemes or inputs differ.
        """
        first = layers[0]
        if any((lay.in_features, lay.scheme, lay.act_bits) != (first.in_features, first.scheme, first.act_bits)
               for lay in layers):
            raise ValueError("only layers with the same input size, scheme and activation bits can be fused")
        has_bias = [lay.bias is not None for lay in layers]
        fused = cls(first.in_features, sum(lay.out_features for lay in layers), first.scheme,
                    act_bits=first.act_bits, bias=any(has_bias), policy=first.policy)
        for name in ("qweight", "scales", "offsets"):
            if getattr(first, name) is not None:
                getattr(fused, name).copy_(torch.cat([getattr(lay, name) for lay in layers]))
        if any(has_bias):
            fused.bias.copy_(torch.cat([lay.bias if lay.bias is not None else torch.zeros(lay.out_features)
                                        for lay in layers]))
        return fused

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.qweight, self.scales, self.offsets, self.scheme, self.in_features)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight [N, K] this layer represents."""
        return self.quantized_weight().dequantize(dtype)

    def select_kernel(self, num_tokens: int, dtype: torch.dtype) -> KernelBackend:
        return self.policy.select(self, num_tokens, dtype)

    def prepare(self, kernel: KernelBackend, dtype: torch.dtype) -> Any:
        """Packed operands of ``kernel`` for activations of ``dtype`` (built once, then cached)."""
        key = (kernel.name, dtype)
        if key not in self._prepared:
            self._prepared[key] = kernel.prepare(self, dtype)
        return self._prepared[key]

    def run_kernel(self, x: torch.Tensor, kernel: KernelBackend) -> torch.Tensor:
        """Apply one specific kernel to x [..., K] (used by tests and benchmarks)."""
        flat = x.reshape(-1, self.in_features)  # [num_tokens, K]
        out = kernel.run(flat, self, self.prepare(kernel, x.dtype))
        return out.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        num_tokens = x.numel() // self.in_features
        if num_tokens > MAX_PLANNED_TOKENS:
            return self.run_kernel(x, self.select_kernel(num_tokens, x.dtype))
        if self._plans_policy is not self.policy:
            self._plans, self._plans_policy = {}, self.policy
        plan = self._plans.get((num_tokens, x.dtype))
        if plan is None:
            kernel = self.select_kernel(num_tokens, x.dtype)
            plan = self._plans[(num_tokens, x.dtype)] = (kernel, self.prepare(kernel, x.dtype))
        out = plan[0].run(x.reshape(num_tokens, self.in_features), self, plan[1])
        return out.reshape(*x.shape[:-1], self.out_features)

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantLinear":
        """Follow device moves but keep the stored dtypes: ``model.to(torch.bfloat16)`` must not round scales."""
        stored = {name: buf for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, old in stored.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        self._prepared.clear()
        self._plans.clear()
        return self

    def _load_from_state_dict(self, *args: Any, **kwargs: Any) -> None:
        self._prepared.clear()  # packed operands describe the old weights
        self._plans.clear()
        super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        group = self.scheme.group_size or "channel"
        sym = "sym" if self.scheme.symmetric else "asym"
        act = f", a{self.act_bits}" if self.act_bits else ""
        return f"in={self.in_features}, out={self.out_features}, w{self.scheme.bits} {sym} g={group}{act}"

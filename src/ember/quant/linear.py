"""``QuantLinear``: a drop-in replacement for ``nn.Linear`` holding packed integer weights."""
from __future__ import annotations

from typing import Any

import torch

from ember.kernels.linear.base import LinearWeights
from ember.kernels.linear.dense import add_channels, pad_channels
from ember.kernels.linear.module import KernelLinear
from ember.kernels.linear.registry import KernelPolicy
from ember.kernels.linear.spec import LinearSpec, QuantizedWeight, WeightScheme


class QuantLinear(KernelLinear):
    """y = x W^T + b with W stored as integer codes and per-group scales.

    Buffers (the checkpoint layout): ``qweight`` int8 [N, K] (8-bit) or uint8 [N, K // 2] (4-bit,
    two codes per byte); ``scales`` float32 [N, groups]; ``offsets`` float32 [N, groups]
    (asymmetric 4-bit only; w = code * scale + offset); ``bias`` [N] if present; ``fallback_weight``
    [N, K] float, if the checkpoint carries a high-precision copy of the op (per-request precision
    fallback; it follows the model's dtype); ``channel_index`` int64 [C] and ``channel_weight`` [N, C] float
    (following the model's dtype), if some input channels were kept in float (``QuantizedWeight``): the
    kernel computes the codes' part and x[:, channel_index] @ channel_weight^T is added (or, for a kernel that
    ``fuses_channels``, the kept columns take their float values inside the kernel). Kernel operands
    are derived from these on first use per activation dtype and are not part of the state dict.

    Args:
        in_features, out_features: as ``nn.Linear``.
        scheme: weight scheme; ``act_bits=8`` adds dynamic int8 activations: per token with 8-bit
            weights (W8A8), per token and weight group with 4-bit ones (W4A8).
        bias: whether the layer has a bias.
        policy: kernel selection policy.
        has_fallback: whether to hold a float copy of the weight (``fallback_weight``).
        num_float_channels: input channels kept in float (``channel_index``, ``channel_weight``).
    """

    def __init__(self, in_features: int, out_features: int, scheme: WeightScheme, *,
                 act_bits: int | None = None, bias: bool = False, policy: KernelPolicy | None = None,
                 has_fallback: bool = False, num_float_channels: int = 0) -> None:
        groups = in_features // scheme.group_len(in_features)
        super().__init__(LinearSpec(in_features, out_features, scheme, act_bits, groups, bias), policy)
        self.scheme, self.act_bits = scheme, act_bits
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
        self.register_buffer("fallback_weight", torch.zeros(out_features, in_features) if has_fallback else None)
        channels = num_float_channels > 0
        self.register_buffer("channel_index", torch.zeros(num_float_channels, dtype=torch.long) if channels else None)
        self.register_buffer("channel_weight", torch.zeros(out_features, num_float_channels) if channels else None)

    @classmethod
    def from_quantized(cls, weight: QuantizedWeight, bias: torch.Tensor | None = None, *,
                       act_bits: int | None = None, policy: KernelPolicy | None = None,
                       fallback_weight: torch.Tensor | None = None) -> "QuantLinear":
        """Build from a ``QuantizedWeight`` (and the float bias of the replaced linear, and optionally
        its float weight as the high-precision copy)."""
        out_features = weight.scales.shape[0]
        channels = 0 if weight.channel_index is None else weight.channel_index.numel()
        layer = cls(weight.in_features, out_features, weight.scheme, act_bits=act_bits,
                    bias=bias is not None, policy=policy, has_fallback=fallback_weight is not None,
                    num_float_channels=channels)
        if fallback_weight is not None:
            layer.fallback_weight.copy_(fallback_weight.detach())
        if channels:
            layer.channel_index.copy_(weight.channel_index)
            layer.channel_weight.copy_(weight.channel_weight)
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
        token, the same for every part; float channels are the union of the parts' (zeros where a part
        has none). Raises ValueError if schemes or inputs differ.
        """
        first = layers[0]
        if any((lay.in_features, lay.scheme, lay.act_bits) != (first.in_features, first.scheme, first.act_bits)
               for lay in layers):
            raise ValueError("only layers with the same input size, scheme and activation bits can be fused")
        has_bias = [lay.bias is not None for lay in layers]
        has_fallback = all(lay.fallback_weight is not None for lay in layers)
        parts = [lay for lay in layers if lay.channel_index is not None]
        channels = torch.unique(torch.cat([lay.channel_index for lay in parts])) if parts else None
        fused = cls(first.in_features, sum(lay.out_features for lay in layers), first.scheme,
                    act_bits=first.act_bits, bias=any(has_bias), policy=first.policy, has_fallback=has_fallback,
                    num_float_channels=0 if channels is None else channels.numel())
        if has_fallback:
            fused.fallback_weight = torch.cat([lay.fallback_weight for lay in layers])
        if parts:
            fused.channel_index.copy_(channels)
            fused.channel_weight = fused.channel_weight.to(parts[0].channel_weight.dtype)
            row = 0
            for lay in layers:
                if lay.channel_index is not None:
                    columns = torch.searchsorted(channels, lay.channel_index)
                    fused.channel_weight[row:row + lay.out_features, columns] = lay.channel_weight
                row += lay.out_features
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
        """The float weight [N, K] this layer represents (float channels included)."""
        weight = self.quantized_weight()
        weight.channel_index, weight.channel_weight = self.channel_index, self.channel_weight
        return weight.dequantize(dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channel_index is None:
            return super().forward(x)
        rows = x.reshape(-1, self.in_features)
        kernel, operands, add_bias = self._cached_plan(rows.shape[0], x.dtype)
        out = kernel.run(rows, self.spec, operands)
        if add_bias:
            out = out + self.bias.to(out.dtype)
        if not kernel.fuses_channels:  # else the kernel wrote the kept columns' values into its own weight
            index, weight = self._channel_operands(x.dtype)
            out = add_channels(out, rows, index, weight)
        return out.reshape(*x.shape[:-1], self.out_features)

    def _channel_operands(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The float channels padded for the GEMV (``pad_channels``), in ``dtype``; cached with the kernels'
        operands."""
        key = ("float_channels", dtype)
        if key not in self._prepared:
            self._prepared[key] = pad_channels(self.channel_index, self.channel_weight.to(dtype))
        return self._prepared[key]

    def native_call(self, num_tokens: int, dtype: torch.dtype) -> tuple[str, list[torch.Tensor], int] | None:
        # float channels ride along as "<kernel>+channels" with two more tensors (decode_layers.cpp)
        call = super().native_call(num_tokens, dtype)
        if call is None or self.channel_index is None or self._cached_plan(num_tokens, dtype)[0].fuses_channels:
            return call
        name, tensors, arg = call
        return name + "+channels", [*tensors, *self._channel_operands(dtype)], arg

    def linear_weights(self) -> LinearWeights:
        return LinearWeights(quantized=self.quantized_weight(), bias=self.bias, channel_index=self.channel_index,
                             channel_weight=self.channel_weight)

    def _apply(self, fn: Any, recurse: bool = True) -> "QuantLinear":
        """Follow device moves but keep the stored dtypes: ``model.to(torch.bfloat16)`` must not round scales."""
        stored = {name: buf for name, buf in self._buffers.items()
                  if buf is not None and name not in ("fallback_weight", "channel_weight")}
        super()._apply(fn, recurse)
        for name, old in stored.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:
                self._buffers[name] = old.to(new.device)
        return self

    def extra_repr(self) -> str:
        group = self.scheme.group_size or "channel"
        sym = "sym" if self.scheme.symmetric else "asym"
        act = f", a{self.act_bits}" if self.act_bits else ""
        return f"in={self.in_features}, out={self.out_features}, w{self.scheme.bits} {sym} g={group}{act}"

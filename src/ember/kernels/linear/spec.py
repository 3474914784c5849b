"""What a linear kernel is given: a frozen description of the layer (``LinearSpec``) and its weights.

The weight format lives here too (``WeightScheme``, ``QuantizedWeight``): kernels read it, the
quantization methods in ``ember.quant`` write it.
"""
from __future__ import annotations

import dataclasses

import torch

from ember.kernels.linear.pack import unpack_int4, unpack_int8

DENSE = "dense"  # float weights
WEIGHT_ONLY = "weight_only"  # integer weights, float activations
W8A8 = "w8a8"  # 8-bit weights, int8 activations per token
W4A8 = "w4a8"  # 4-bit weights, int8 activations per token and weight group


@dataclasses.dataclass(frozen=True)
class WeightScheme:
    """How a weight matrix [out_features, in_features] is quantized.

    ``group_size=None`` means one scale per output channel. 8-bit is symmetric with signed codes in
    [-127, 127]; 4-bit codes are unsigned in [0, 15], centred on 8 (symmetric) or offset by the
    group minimum (asymmetric).
    """

    bits: int = 8
    group_size: int | None = None
    symmetric: bool = True

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        if self.bits == 8 and not self.symmetric:
            raise ValueError("8-bit weights are symmetric")
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive, got {self.group_size}")

    def group_len(self, in_features: int) -> int:
        """Columns per scale; raises ValueError if the group size does not divide ``in_features``."""
        size = self.group_size or in_features
        if in_features % size:
            raise ValueError(f"group_size {size} does not divide in_features {in_features}")
        return size

    @property
    def qmin(self) -> int:
        return 0 if self.bits == 4 else -127

    @property
    def qmax(self) -> int:
        return 15 if self.bits == 4 else 127


@dataclasses.dataclass
class QuantizedWeight:
    """Packed weight codes and their quantization parameters; w = code * scale + offset per group.

    qweight: int8 [N, K] (8-bit) or uint8 [N, K // 2] (4-bit, see ``pack_int4``).
    scales: float32 [N, num_groups]. offsets: float32 [N, num_groups] for asymmetric 4-bit (the group
    minimum, as in GGUF Q4_1), else None (implied: -8 * scale for symmetric 4-bit, 0 for 8-bit).
    channel_index: int64 [C], input channels kept in float (GPTQ with ``bf16_channels``), else None;
    channel_weight: float [N, C], what those columns add on top of their codes (w - code * scale -
    offset). Most kernels compute the codes' part only and ``QuantLinear`` adds x[:, channel_index] @
    channel_weight^T; a kernel with ``fuses_channels`` (int4_dpbf16) computes both.
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    scheme: WeightScheme
    in_features: int
    channel_index: torch.Tensor | None = None
    channel_weight: torch.Tensor | None = None

    def codes(self) -> torch.Tensor:
        """Unpacked integer codes [N, K] (int16 to keep arithmetic safe)."""
        if self.scheme.bits == 4:
            return unpack_int4(self.qweight).to(torch.int16)
        return unpack_int8(self.qweight).to(torch.int16)

    def group_offsets(self) -> torch.Tensor:
        """Float offset per group [N, num_groups], explicit for every scheme."""
        if self.offsets is not None:
            return self.offsets.float()
        return implied_offset(self.scales.float(), self.scheme)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Reference dequantization: code * scale + offset per group, plus the float channels -> [N, K] in ``dtype``."""
        weight = dequantize_codes(self.codes(), self.scales, self.group_offsets(), self.in_features)
        if self.channel_index is not None:
            weight.index_add_(1, self.channel_index, self.channel_weight.float())
        return weight.to(dtype)


def implied_offset(scale: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Offset of a symmetric scheme: codes 0..15 centred on 8 at 4 bits, signed codes at 8 bits."""
    return -8.0 * scale if scheme.bits == 4 else torch.zeros_like(scale)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int) -> torch.Tensor:
    """codes * scales + offsets with [N, G] parameters expanded over groups -> float32 [N, K]."""
    rows, groups = scales.shape
    grouped = codes.float().view(rows, groups, in_features // groups)
    out = grouped * scales.float().unsqueeze(-1) + offsets.float().unsqueeze(-1)
    return out.view(rows, in_features)


@dataclasses.dataclass(frozen=True)
class LinearSpec:
    """One linear layer y = x W^T (+ b) as the kernels see it; no tensors.

    Args:
        in_features, out_features: K and N.
        scheme: the integer weight scheme, or None for float weights.
        act_bits: 8 for dynamic int8 activations (quantized weights only), else None.
        num_groups: scales per output channel (1 per channel, K / group length otherwise; 1 for dense).
        has_bias: whether the layer adds a bias.
    """

    in_features: int
    out_features: int
    scheme: WeightScheme | None = None
    act_bits: int | None = None
    num_groups: int = 1
    has_bias: bool = False

    def __post_init__(self) -> None:
        if self.act_bits not in (None, 8):
            raise ValueError(f"act_bits must be None or 8, got {self.act_bits}")
        if self.act_bits is not None and self.scheme is None:
            raise ValueError("int8 activations need quantized weights")

    @property
    def kind(self) -> str:
        """DENSE, WEIGHT_ONLY, W8A8 or W4A8: which family of kernels can compute this layer."""
        if self.scheme is None:
            return DENSE
        if self.act_bits is None:
            return WEIGHT_ONLY
        return W8A8 if self.scheme.bits == 8 else W4A8

    @property
    def bits(self) -> int | None:
        return None if self.scheme is None else self.scheme.bits

    @property
    def group_len(self) -> int:
        """Input channels per scale (K for dense and per-channel weights)."""
        return self.in_features // self.num_groups

    @property
    def per_channel(self) -> bool:
        return self.num_groups == 1

"""Round-to-nearest weight quantization: schemes, quantization parameters, codes and dequantization."""
from __future__ import annotations

import dataclasses

import torch

from ember.quant.pack import pack_int4, pack_int8, unpack_int4, unpack_int8


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
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    offsets: torch.Tensor | None
    scheme: WeightScheme
    in_features: int

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
        """Reference dequantization: code * scale + offset per group -> [N, K] in ``dtype``."""
        return dequantize_codes(self.codes(), self.scales, self.group_offsets(), self.in_features).to(dtype)


def implied_offset(scale: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Offset of a symmetric scheme: codes 0..15 centred on 8 at 4 bits, signed codes at 8 bits."""
    return -8.0 * scale if scheme.bits == 4 else torch.zeros_like(scale)


def compute_qparams(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and offset for each row of ``w`` [N, group] -> ([N, 1], [N, 1]) float.

    Symmetric: scale = max|w| / 7 (4-bit) or / 127 (8-bit), offset implied.
    Asymmetric (4-bit): scale = (max - min) / 15, offset = min, so a GGUF Q4_1 grid is reproduced.
    """
    w = w.float()
    if scheme.symmetric:
        scale = w.abs().amax(dim=1, keepdim=True) / (7 if scheme.bits == 4 else 127)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero rows
        return scale, implied_offset(scale, scheme)
    lo, hi = w.amin(dim=1, keepdim=True), w.amax(dim=1, keepdim=True)
    scale = (hi - lo) / (scheme.qmax - scheme.qmin)
    return torch.where(scale > 0, scale, torch.ones_like(scale)), lo  # constant rows: code 0 -> lo


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Integer codes clamp(round((w - offset) / scale)) for broadcastable scale/offset."""
    return torch.clamp(torch.round((w.float() - offset) / scale), scheme.qmin, scheme.qmax)


def fake_quantize_group(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Quantize then dequantize with the given parameters (float result, same shape as ``w``)."""
    return quantize_codes(w, scale, offset, scheme) * scale + offset


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, in_features: int) -> torch.Tensor:
    """codes * scales + offsets with [N, G] parameters expanded over groups -> float32 [N, K]."""
    rows, groups = scales.shape
    grouped = codes.float().view(rows, groups, in_features // groups)
    out = grouped * scales.float().unsqueeze(-1) + offsets.float().unsqueeze(-1)
    return out.view(rows, in_features)


def grouped_qparams(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN parameters of every group of ``w`` [N, K] -> (scales, offsets), each [N, K // group]."""
    rows, cols = w.shape
    size = scheme.group_len(cols)
    # [N * G, group] so every group gets its own parameters
    scale, offset = compute_qparams(w.reshape(rows * (cols // size), size), scheme)
    return scale.view(rows, cols // size), offset.view(rows, cols // size)


def pack_weight(codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """Build a ``QuantizedWeight`` from integer codes [N, K] and [N, G] parameters."""
    qweight = pack_int4(codes) if scheme.bits == 4 else pack_int8(codes)
    kept = None if scheme.symmetric else offsets.float().contiguous()
    return QuantizedWeight(qweight, scales.float().contiguous(), kept, scheme, codes.shape[1])


def quantize_weight(w: torch.Tensor, scheme: WeightScheme) -> QuantizedWeight:
    """Round-to-nearest quantization of a weight [N, K].

    Raises:
        ValueError: if the group size does not divide K, or K is odd at 4 bits.
    """
    rows, cols = w.shape
    scale, offset = grouped_qparams(w, scheme)
    size = cols // scale.shape[1]
    codes = quantize_codes(w.reshape(rows, -1, size), scale.unsqueeze(-1), offset.unsqueeze(-1), scheme)
    return pack_weight(codes.reshape(rows, cols).to(torch.int16), scale, offset, scheme)


def fake_quantize(w: torch.Tensor, scheme: WeightScheme) -> torch.Tensor:
    """Quantize-dequantize ``w`` [N, K] with RTN (float32 result), used by searches and tests."""
    rows, cols = w.shape
    scale, offset = grouped_qparams(w, scheme)
    grouped = w.float().reshape(rows, scale.shape[1], -1)
    return fake_quantize_group(grouped, scale.unsqueeze(-1), offset.unsqueeze(-1), scheme).reshape(rows, cols)


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio 10 log10(|ref|^2 / |ref - approx|^2) in dB."""
    noise = (reference.float() - approx.float()).pow(2).sum()
    return float(10 * torch.log10(reference.float().pow(2).sum() / noise.clamp(min=1e-30)))

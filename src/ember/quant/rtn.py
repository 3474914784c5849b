"""Round-to-nearest weight quantization: quantization parameters, codes, fake quantization and SQNR."""
from __future__ import annotations

import torch

from ember.kernels.linear.pack import pack_int4, pack_int8
from ember.kernels.linear.spec import QuantizedWeight, WeightScheme, implied_offset


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


def grouped_qparams(w: torch.Tensor, scheme: WeightScheme) -> tuple[torch.Tensor, torch.Tensor]:
    """RTN parameters of every group of ``w`` [N, K] -> (scales, offsets), each [N, K // group]."""
    rows, cols = w.shape
    size = scheme.group_len(cols)
    # [N * G, group] so every group gets its own parameters
    scale, offset = compute_qparams(w.reshape(rows * (cols // size), size), scheme)
    return scale.view(rows, cols // size), offset.view(rows, cols // size)


# range shrink factors the weighted clip search tries for each group: 1.00, 0.98, ..., 0.70
CLIP_SHRINKS = tuple(1.0 - 0.02 * i for i in range(16))


def weighted_qparams(w: torch.Tensor, scheme: WeightScheme, column_weights: torch.Tensor,
                     shrinks: tuple[float, ...] = CLIP_SHRINKS) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped RTN parameters as ``grouped_qparams`` gives them for ``w`` [N, K] scaled by a factor p of
    ``shrinks`` (the range shrunk toward 0, so the largest weights clip), p chosen per (row, group) to minimize
    the group's rounding error sum_j c_j (w_j - q(w_j))^2 with c = ``column_weights`` [K]. GPTQ passes its
    Hessian diagonal 2 E[x_j^2], so the error is the one the layer's outputs see when errors of different
    columns are uncorrelated. -> (scales, offsets), each [N, K // group]."""
    rows, cols = w.shape
    size = scheme.group_len(cols)
    w = w.float()
    groups = w.view(rows, cols // size, size)
    weights = column_weights.float().view(1, cols // size, size)
    best = None  # (error, scale, offset) of the best factor so far, per (row, group)
    for shrink in shrinks:
        scale, offset = grouped_qparams(w * shrink, scheme)
        deq = fake_quantize_group(groups, scale.unsqueeze(-1), offset.unsqueeze(-1), scheme)
        candidate = (((deq - groups) ** 2 * weights).sum(-1), scale, offset)
        better = None if best is None else candidate[0] < best[0]
        best = candidate if best is None else tuple(torch.where(better, new, old) for new, old in zip(candidate, best))
    return best[1], best[2]


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

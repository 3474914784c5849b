"""The statistics sensitivity analysis reports: activation dispersion, spectral energy, skewness, KL, rank
correlation. Pure functions of tensors."""
from __future__ import annotations

import torch


def dispersion(x: torch.Tensor) -> float:
    """Max over channels of (max - min) / IQR of ``x`` [tokens, channels]: how far a channel's extremes
    lie outside its bulk (large for the outlier channels that stretch a quantization grid)."""
    x = x.reshape(-1, x.shape[-1]).float()
    q1, q3 = torch.quantile(x, torch.tensor([0.25, 0.75]), dim=0)  # [channels] each
    spread = x.amax(dim=0) - x.amin(dim=0)
    iqr = (q3 - q1).clamp(min=1e-12)
    return float((spread / iqr).max())


def spectral_energy(weight: torch.Tensor) -> float:
    """sigma_1 / sum(sigma_i) of ``weight`` [N, K]: near 1 when one direction carries the matrix."""
    sigma = torch.linalg.svdvals(weight.double())
    return float(sigma[0] / sigma.sum())


def skewness(x: torch.Tensor) -> float:
    """Pearson's third standardized moment E[(x - mu)^3] / sigma^3 over every element of ``x``."""
    x = x.reshape(-1).double()
    centred = x - x.mean()
    std = centred.pow(2).mean().sqrt()
    return float(centred.pow(3).mean() / std.clamp(min=1e-30).pow(3))


def kl_divergence(ref_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per row of log-probabilities [rows, vocab] -> [rows] (float64 sums)."""
    return (ref_logprobs.exp() * (ref_logprobs - logprobs)).double().sum(dim=-1)


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Average ranks (ties share the mean of their positions), float64."""
    order = torch.argsort(values, stable=True)
    ranks = torch.empty(len(values), dtype=torch.float64)
    ranks[order] = torch.arange(len(values), dtype=torch.float64)
    for value in torch.unique(values):
        tied = values == value
        if int(tied.sum()) > 1:
            ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation of two equally long sequences (Pearson's r of their ranks)."""
    if len(a) != len(b) or len(a) < 2:
        raise ValueError("need two sequences of the same length >= 2")
    ra, rb = _ranks(torch.tensor(a, dtype=torch.float64)), _ranks(torch.tensor(b, dtype=torch.float64))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp(min=1e-30))

"""AWQ (Lin et al. 2023): activation-aware per-channel scaling searched on calibration outputs."""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import torch
from torch import nn

from ember.quant.calibration import swapped_weights
from ember.quant.rtn import WeightScheme, fake_quantize

Inspect = Callable[[torch.Tensor], torch.Tensor]


@dataclasses.dataclass(frozen=True)
class AwqSearchResult:
    """Chosen scales [K], exponent alpha, and the block output MSE at alpha and at alpha = 0 (plain RTN)."""

    scales: torch.Tensor
    alpha: float
    loss: float
    rtn_loss: float


def concat_outputs(linears: Sequence[nn.Linear]) -> Inspect:
    """Default block: the linears' outputs side by side."""
    return lambda x: torch.cat([lin(x) for lin in linears], dim=-1)


@torch.no_grad()
def awq_search_scales(x: torch.Tensor, linears: Sequence[nn.Linear], scheme: WeightScheme, *,
                      n_grid: int = 20, inspect: Inspect | None = None) -> AwqSearchResult:
    """Grid-search s = mean|x|^alpha, alpha in {0, 1/n_grid, ..., 1}, minimizing the block output error.

    For each alpha the linears' weights become Q(W diag(s)) diag(s)^-1 (AWQ Eq. 4-5), the block
    runs on the calibration inputs and its MSE against the float output is measured.

    Args:
        x: calibration inputs of the linears [tokens, K].
        linears: linears sharing that input.
        scheme: weight scheme used for the trial quantization.
        n_grid: number of grid steps.
        inspect: block to evaluate (e.g. the MLP for gate/up); defaults to ``concat_outputs``.
    Returns:
        ``AwqSearchResult``; alpha = 0 (s = 1) is in the grid, so the loss never exceeds RTN's.
    """
    inspect = inspect or concat_outputs(linears)
    x = x.reshape(-1, x.shape[-1]).to(linears[0].weight.dtype)
    reference = inspect(x)
    x_mean = x.abs().float().mean(dim=0)  # [K] per-channel activation magnitude
    originals = [lin.weight.data.float() for lin in linears]
    best = None
    for step in range(n_grid + 1):
        alpha = step / n_grid
        scales = x_mean.pow(alpha).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()  # centre the range around 1
        trial = [fake_quantize(w * scales, scheme) / scales for w in originals]
        with swapped_weights(linears, trial):
            loss = float((inspect(x) - reference).float().pow(2).mean())
        if step == 0:
            rtn_loss = loss
        if best is None or loss < best[2]:
            best = (scales, alpha, loss)
    return AwqSearchResult(best[0], best[1], best[2], rtn_loss)


@torch.no_grad()
def awq_search_clip(x: torch.Tensor, weight: torch.Tensor, scheme: WeightScheme, *, n_grid: int = 20,
                    max_shrink: float = 0.5, max_tokens: int = 512) -> torch.Tensor:
    """Per (output channel, group) clipping threshold minimizing that group's output error (AWQ Sec. 3.3).

    For each ratio r in {1, 1 - 1/n_grid, ..., 1 - max_shrink} the group is clamped to +-r max|w|,
    quantized, and the error of its contribution sum_j x_j (w_j - q_j) is averaged over tokens.

    Args:
        x: calibration inputs [tokens, K] (the first ``max_tokens`` rows are used).
        weight: float weight [N, K] (already scaled if AWQ scales were folded).
    Returns:
        max |w| to clamp to, float32 [N, groups]; r = 1 is in the grid, so RTN is never worse.
    """
    rows, cols = weight.shape
    size = scheme.group_len(cols)
    x = x.reshape(-1, cols)[:max_tokens].float().view(-1, cols // size, size)  # [T, G, group]
    w = weight.float().view(rows, cols // size, size)  # [N, G, group]
    original_max = w.abs().amax(dim=-1)  # [N, G]
    best_max, best_err = original_max.clone(), None
    for step in range(int(max_shrink * n_grid) + 1):
        limit = original_max * (1.0 - step / n_grid)
        clipped = torch.maximum(torch.minimum(w, limit.unsqueeze(-1)), -limit.unsqueeze(-1))
        diff = w - fake_quantize(clipped.view(rows, cols), scheme).view_as(w)
        err = torch.einsum("tgj,ngj->tng", x, diff).pow(2).mean(dim=0)  # [N, G]
        if best_err is None:
            best_err = err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_max = torch.where(better, limit, best_max)
    return best_max


def apply_clip(weight: torch.Tensor, max_abs: torch.Tensor) -> None:
    """Clamp ``weight`` [N, K] in place to +-max_abs per group ([N, groups])."""
    rows, cols = weight.shape
    limit = max_abs.to(weight.dtype).unsqueeze(-1)  # [N, G, 1]
    grouped = weight.data.view(rows, max_abs.shape[1], cols // max_abs.shape[1])
    torch.maximum(torch.minimum(grouped, limit), -limit, out=grouped)

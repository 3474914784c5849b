"""SmoothQuant (Xiao et al. 2022): migrate activation outliers into weights before W8A8 quantization."""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def smoothing_scales(act_abs_max: torch.Tensor, linears: Sequence[nn.Linear], alpha: float = 0.5,
                     min_value: float = 1e-5) -> torch.Tensor:
    """s_j = max|X_j|^alpha / max|W_j|^(1 - alpha) per input channel j (SmoothQuant Eq. 4).

    Args:
        act_abs_max: per-channel max |x| over the calibration set [K].
        linears: linears sharing the input; max|W_j| is over all their output rows.
        alpha: migration strength in [0, 1].
    Returns:
        float32 [K]; channels that never fire get s = 1.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    w_max = torch.stack([lin.weight.detach().abs().amax(dim=0).float() for lin in linears]).amax(dim=0)
    a_max = act_abs_max.float().clamp(min=min_value)
    scales = a_max.pow(alpha) / w_max.clamp(min=min_value).pow(1.0 - alpha)
    return torch.where(act_abs_max > 0, scales.clamp(min=min_value), torch.ones_like(scales))

"""GPTQ (Frantar et al. 2022): column-wise quantization with second-order error compensation."""
from __future__ import annotations

import dataclasses

import torch

from ember.quant.rtn import (QuantizedWeight, WeightScheme, compute_qparams, grouped_qparams, pack_weight,
                             weighted_qparams)


class HessianAccumulator:
    """A capture reducer keeping H = 2/n sum_t x_t x_t^T per module (GPTQ Eq. 2), float64 [K, K]."""

    def __init__(self) -> None:
        self.hessians: dict[str, torch.Tensor] = {}
        self.num_tokens: dict[str, int] = {}
        self._last: tuple[tuple, torch.Tensor, torch.Tensor] | None = None

    def _gram(self, tensor: torch.Tensor) -> torch.Tensor:
        # q/k/v (and gate/up) receive the same input tensor (hooks see detached aliases of it):
        # compute X^T X once for them; the version counter guards against in-place changes, and
        # holding the tensor keeps its address from being reused by the next batch
        key = (tensor.data_ptr(), tuple(tensor.shape), tensor.stride(), tensor._version)
        if self._last is not None and self._last[0] == key:
            return self._last[2]
        x = tensor.reshape(-1, tensor.shape[-1]).float()  # [tokens, K]
        gram = (x.T @ x).double()  # float32 products as in the GPTQ reference; accumulate in float64
        self._last = (key, tensor, gram)
        return gram

    def __call__(self, name: str, tensor: torch.Tensor) -> None:
        seen = self.num_tokens.get(name, 0)
        total = seen + tensor.numel() // tensor.shape[-1]
        hessian = self.hessians.get(name)
        update = 2.0 * self._gram(tensor) / total
        self.hessians[name] = update if hessian is None else hessian * (seen / total) + update
        self.num_tokens[name] = total


def _inverse_cholesky(hessian: torch.Tensor, percdamp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp I)^-1, damp = percdamp * mean(diag H) (GPTQ Sec. 4, step 3)."""
    damp = percdamp * torch.diagonal(hessian).mean()
    hessian = hessian + damp * torch.eye(hessian.shape[0], dtype=hessian.dtype)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(hessian))
    return torch.linalg.cholesky(inverse, upper=True)


def channel_saliency(weights: list[torch.Tensor], hessian: torch.Tensor) -> torch.Tensor:
    """Per input channel j: E[x_j^2] * sum over ``weights`` of ||W[:, j]||^2, the energy the channel carries into
    the outputs of the linears that read it ([K], float32; ``hessian`` is 2 X^T X / n, so its diagonal is 2 E[x^2])."""
    energy = sum(w.detach().float().pow(2).sum(0) for w in weights)
    return torch.diagonal(hessian).float() * energy


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, scheme: WeightScheme, *, block_size: int = 128,
                  percdamp: float = 0.01, act_order: bool = False,
                  keep_channels: torch.Tensor | None = None, clip_search: bool = False) -> QuantizedWeight:
    """Quantize ``weight`` [N, K] column by column, spreading each column's error over the rest.

    Args:
        weight: float weight [N, K].
        hessian: 2 X^T X / n from calibration inputs [K, K].
        scheme: target weight scheme (group params are computed when a group starts, from the
            error-updated weights; with ``act_order`` they are computed up front on the original
            weights so groups stay contiguous in the stored layout).
        block_size: columns updated lazily together (rounded to a multiple of the group size).
        percdamp: damping as a fraction of the mean Hessian diagonal.
        act_order: quantize columns in decreasing diag(H) order.
        keep_channels: input channels [C] (int64) kept in float. They come last in the order, so they
            take the error updates of every quantized column and are never rounded (as the unquantized
            columns of GPTQ's lazy batches are); their codes are what 0 rounds to, and the result's
            ``channel_weight`` holds the rest. Group parameters are computed up front, as with
            ``act_order``, on the weight with these columns zeroed.
        clip_search: each group's range shrunk by the factor that minimizes its rounding error weighted by
            the Hessian diagonal (``weighted_qparams``), instead of spanning the group's extremes.
    Returns:
        a ``QuantizedWeight`` in the original column order.
    """
    rows, cols = weight.shape
    size = scheme.group_len(cols)
    block_size = max(size, block_size // size * size) if scheme.group_size else block_size
    hessian = hessian.double().clone()
    dead = torch.diagonal(hessian) == 0  # channels never active: any value is fine, pin to 0
    hessian[dead, dead] = 1.0
    keep = torch.zeros(cols, dtype=torch.bool)
    if keep_channels is not None:
        keep[keep_channels] = True
    order = torch.argsort(torch.diagonal(hessian), descending=True) if act_order else torch.arange(cols)
    perm = torch.cat([order[~keep[order]], order[keep[order]]])
    w = weight.detach().float().clone()
    w[:, dead] = 0.0
    static = act_order or keep_channels is not None
    # original-order params (kept columns as zeros); overwritten group by group when computed dynamically
    weighting = torch.diagonal(hessian).float().masked_fill(keep | dead, 0.0) if clip_search else None
    original = weight.detach().float().masked_fill(keep, 0.0)
    scales, offsets = (grouped_qparams(original, scheme) if weighting is None
                       else weighted_qparams(original, scheme, weighting))
    w = w[:, perm].contiguous()  # [N, K] in quantization order
    hinv = _inverse_cholesky(hessian[perm][:, perm], percdamp).float()  # [K, K] upper, float32 as in GPTQ

    state = _State(codes=torch.zeros(rows, cols, dtype=torch.int16), scales=scales, offsets=offsets,
                   order=perm.tolist(), size=size, dynamic=bool(scheme.group_size) and not static,
                   num_quantized=cols - int(keep.sum()),
                   weighting=None if weighting is None else weighting[perm])
    for start in range(0, cols, block_size):
        end = min(start + block_size, cols)
        errors = _quantize_block(w, hinv, start, end, state, scheme)
        w[:, end:] -= errors @ hinv[start:end, end:]  # lazy batch update (GPTQ Sec. 4, step 2)
    packed = pack_weight(state.codes, state.scales, state.offsets, scheme)
    if keep_channels is not None:
        index, where = perm[state.num_quantized:].sort()
        packed.channel_weight = w[:, state.num_quantized:][:, where] - packed.dequantize()[:, index]
        packed.channel_index = index
    return packed


@dataclasses.dataclass
class _State:
    codes: torch.Tensor  # int16 [N, K], original column order
    scales: torch.Tensor  # [N, groups]
    offsets: torch.Tensor  # [N, groups]
    order: list[int]  # quantization position -> original column
    size: int  # group length
    dynamic: bool  # group params computed when the group starts (no act-order)
    num_quantized: int  # positions from here on are kept in float (their final values written back to w)
    weighting: torch.Tensor | None = None  # clip search: Hessian diagonal [K] in quantization order


def _quantize_block(w: torch.Tensor, hinv: torch.Tensor, start: int, end: int, state: _State,
                    scheme: WeightScheme) -> torch.Tensor:
    """Quantize columns [start, end) one by one, updating the rest of the block (GPTQ Alg. 1)."""
    block = w[:, start:end].clone()  # [N, B]
    errors = torch.zeros_like(block)
    for i in range(end - start):
        column = state.order[start + i]
        group = column // state.size
        if state.dynamic and (start + i) % state.size == 0:
            part = block[:, i:i + state.size]
            scale, offset = (compute_qparams(part, scheme) if state.weighting is None else weighted_qparams(
                part, scheme, state.weighting[start + i:start + i + state.size]))
            state.scales[:, group], state.offsets[:, group] = scale[:, 0], offset[:, 0]
        scale, offset = state.scales[:, group], state.offsets[:, group]
        if start + i >= state.num_quantized:  # kept in float: the code of 0, no error to spread
            w[:, start + i] = block[:, i]
            state.codes[:, column] = torch.round(-offset / scale).clamp_(scheme.qmin, scheme.qmax).to(torch.int16)
            continue
        q = torch.round((block[:, i] - offset) / scale).clamp_(scheme.qmin, scheme.qmax)  # [N]
        state.codes[:, column] = q.to(torch.int16)
        err = (block[:, i] - (q * scale + offset)) / hinv[start + i, start + i]
        block[:, i:].addr_(err, hinv[start + i, start + i:end], alpha=-1.0)
        errors[:, i] = err
    return errors

"""The side pool of 4-bit residuals that corrects outlier tokens of an int8-static KV cache, keyed by
cache slot."""

from __future__ import annotations

import torch

from ember.attention.kv_quant import dequantize_residual, quantize_residual, relative_error

# Residual rows reserved per cache slot: outliers past this share go uncorrected (counted as dropped).
RESIDUAL_POOL_FRACTION = 1 / 16


class ResidualPool:
    """4-bit residuals of outlier tokens, in rows handed out from a fixed pool and found by slot.

    A slot's row is released when the slot is written again, so a block that stays in the prefix
    cache keeps its residuals. The running mean of the relative error covers every token written.
    """

    def __init__(self, num_slots: int, num_kv_heads: int, head_dim: int, factor: float) -> None:
        capacity = max(1, int(num_slots * RESIDUAL_POOL_FRACTION))
        self.factor = factor
        self.index = torch.full((num_slots,), -1, dtype=torch.int32)  # slot -> residual row
        self.codes = torch.zeros(capacity, num_kv_heads, head_dim // 2, dtype=torch.uint8)
        self.scales = torch.zeros(capacity, num_kv_heads, dtype=torch.float32)
        self._free_rows = list(range(capacity - 1, -1, -1))  # a stack, lowest row on top
        self.error_sum = 0.0
        self.num_tokens = 0
        self.num_outliers = 0
        self.num_dropped = 0  # outliers left uncorrected because the pool was full

    @property
    def num_rows_in_use(self) -> int:
        return self.codes.shape[0] - len(self._free_rows)

    @property
    def row_bytes(self) -> int:
        """Bytes of one residual row: packed codes and scales over every KV head."""
        return self.codes[0].numel() + 4 * self.scales.shape[1]

    def record(self, x: torch.Tensor, approx: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        """Give the outliers among the written tokens x [T, KVH, D] (approx: their dequantized codes)
        a residual row; release the rows the overwritten slots held."""
        old = self.index[slot_mapping]
        self._free_rows.extend(old[old >= 0].tolist())
        self.index[slot_mapping] = -1
        errors = relative_error(x, approx)  # [T]
        mean = self.error_sum / self.num_tokens if self.num_tokens else errors.mean().item()
        self.error_sum += errors.sum().item()
        self.num_tokens += len(errors)
        outliers = (errors > self.factor * mean).nonzero().flatten()
        self.num_outliers += len(outliers)
        kept = min(len(outliers), len(self._free_rows))
        self.num_dropped += len(outliers) - kept
        if kept == 0:
            return
        outliers = outliers[:kept]
        rows = torch.tensor([self._free_rows.pop() for _ in range(kept)], dtype=torch.int64)
        self.codes[rows], self.scales[rows] = quantize_residual(x.float()[outliers] - approx[outliers])
        self.index[slot_mapping[outliers]] = rows.to(torch.int32)

    def move(self, src: torch.Tensor, dst: torch.Tensor, dropped: torch.Tensor) -> None:
        """Residuals follow their tokens from `src` to `dst`; rows of tokens not moved are released."""
        moved = self.index[src].clone()
        kept = set(moved[moved >= 0].tolist())
        old = torch.cat([self.index[dst], self.index[dropped]])
        self._free_rows.extend(row for row in old[old >= 0].tolist() if row not in kept)
        self.index[dropped] = -1
        self.index[dst] = moved

    def add_to(self, values: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
        """values [..., S, KVH, D] float32 read from `slots` [..., S]; returns them with residuals added."""
        rows = self.index[slots]
        has_row = rows >= 0
        if bool(has_row.any()):
            picked = rows[has_row].long()
            values[has_row] += dequantize_residual(self.codes[picked], self.scales[picked])
        return values

"""`LoRALinear`: a linear plus the low-rank deltas of every adapter slot, applied per row through the
step's `LoRABatch` column mask (one shrink and one expand matmul per call, whatever the adapter mix)."""

from __future__ import annotations

import torch
from torch import nn

from ember.models.layers.precision import PrecisionMask, apply_linear


class LoRABatch:
    """Which slot each row of the current step uses, as a 0/1 mask over the stacked rank columns.

    Owned by the `LoRAManager`, set by the model runner before each forward and read by every
    `LoRALinear` (as vLLM's punica wrapper). Slot s owns columns [s * max_rank, (s + 1) * max_rank);
    a row with no adapter is all zeros, so base rows get exactly the base output.
    """

    def __init__(self, max_loras: int, max_rank: int) -> None:
        self.max_loras, self.max_rank = max_loras, max_rank
        self._masks: dict[int, torch.Tensor] = {}  # slices -> [rows, slices * max_loras * max_rank]

    def set_rows(self, num_rows: int, spans: list[tuple[int, int, int]], dtype: torch.dtype) -> None:
        """`spans`: (slot, first row, end row) of the step's adapter rows; empty: no LoRA work this step."""
        self._masks = {}
        if not spans:
            return
        mask = torch.zeros(num_rows, self.max_loras * self.max_rank, dtype=dtype)
        for slot, start, end in spans:
            mask[start:end, slot * self.max_rank:(slot + 1) * self.max_rank] = 1
        self._masks[1] = mask

    def column_mask(self, num_slices: int) -> torch.Tensor | None:
        """The mask for a layer stacking `num_slices` projections (q/k/v: 3); None when no row is adapted."""
        base = self._masks.get(1)
        if base is None or num_slices == 1:
            return base
        if num_slices not in self._masks:
            self._masks[num_slices] = base.repeat(1, num_slices)
        return self._masks[num_slices]


class LoRALinear(nn.Module):
    """`base(x) + ((x @ A.T) * mask) @ B.T` over all slots at once.

    A [slices * slots * rank, K] stacks every slot's lora_A; B [N, slices * slots * rank] is block
    diagonal over the slices of a fused layer (q/k/v, gate/up), so each part only sees its own pairs.
    Unused slots and ranks below `max_rank` are zeros.
    """

    accepts_precision_mask = True  # a wrapped dual-precision linear still gets the step's mask

    def __init__(self, base: nn.Module, slice_sizes: list[int], batch: LoRABatch, dtype: torch.dtype) -> None:
        super().__init__()
        self.base = base
        self.batch = batch
        self.slice_sizes = slice_sizes
        self.in_features, self.out_features = base.in_features, sum(slice_sizes)
        columns = len(slice_sizes) * batch.max_loras * batch.max_rank
        self.register_buffer("lora_a", torch.zeros(columns, self.in_features, dtype=dtype))
        self.register_buffer("lora_b", torch.zeros(self.out_features, columns, dtype=dtype))

    def forward(self, x: torch.Tensor, mask: PrecisionMask | None = None) -> torch.Tensor:
        out = apply_linear(self.base, x, mask)
        columns = self.batch.column_mask(len(self.slice_sizes))
        if columns is None:
            return out
        # in place: the base output is this call's own fresh tensor, and a second [T, N] pass costs more
        # than the rank-sized matmuls themselves
        return out.addmm_((x @ self.lora_a.T) * columns, self.lora_b.T)  # [T, N]

    def set_slot(self, slot: int, pairs: list[tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Write one slot's (A [r, K], B [N_i, r]) per slice (None: that slice is not adapted)."""
        rank, slots = self.batch.max_rank, self.batch.max_loras
        row = 0
        for index, (size, pair) in enumerate(zip(self.slice_sizes, pairs)):
            first = (index * slots + slot) * rank
            self.lora_a[first:first + rank] = 0
            self.lora_b[:, first:first + rank] = 0
            if pair is not None:
                a, b = pair
                self.lora_a[first:first + a.shape[0]] = a.to(self.lora_a.dtype)
                self.lora_b[row:row + size, first:first + a.shape[0]] = b.to(self.lora_b.dtype)
            row += size

    def extra_repr(self) -> str:
        return f"slices={self.slice_sizes}, slots={self.batch.max_loras}, max_rank={self.batch.max_rank}"

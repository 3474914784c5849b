"""What the AMX kernels (``csrc/amx.h``) share on the Python side: whether they can run, and the B-tile order."""
from __future__ import annotations

import functools
import os

import torch

from ember.quant.native import quant_ops

TILE_N = 16  # columns per B tile (and rows per tile)


def amx_disabled() -> bool:
    """EMBER_DISABLE_AMX=1 runs ember's kernels as on a CPU without AMX (with ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16,
    torch's oneDNN matmuls too): how a Xeon measures what a Zen 4 or an older Xeon runs."""
    return os.environ.get("EMBER_DISABLE_AMX") == "1"


@functools.cache
def has_amx() -> bool:
    """Whether the native kernels are compiled with AMX-BF16 and the OS grants tile data."""
    ops = quant_ops()
    return ops is not None and not amx_disabled() and bool(ops.has_amx())


@functools.cache
def has_amx_int8() -> bool:
    """Whether the native kernels are compiled with AMX-INT8 and the OS grants tile data."""
    ops = quant_ops()
    return ops is not None and not amx_disabled() and bool(ops.has_amx_int8())


def b_tiles(matrix: torch.Tensor, per_row: int) -> torch.Tensor:
    """[N, C] -> [N / 16, C / (16 per_row), 16, 16 per_row]: one AMX B tile contiguous, its row r holding
    elements r * per_row ... (r + 1) * per_row - 1 of each of its 16 columns (per_row: what one column
    puts in a 64-byte tile row, e.g. 2 bf16 values or 4 int8 codes). Same size as ``matrix``."""
    rows = matrix.shape[0]
    grouped = matrix.reshape(rows // TILE_N, TILE_N, -1, 16, per_row)
    # [N / 16, 16 columns, tiles along C, 16 tile rows, per_row] -> [N / 16, tiles, 16 tile rows, 16 columns, per_row]
    return grouped.permute(0, 2, 3, 1, 4).reshape(rows // TILE_N, -1, 16, TILE_N * per_row).contiguous()

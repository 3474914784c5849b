"""Per-op precision plans: which op of which layer is int4, int8 or kept in bf16, and what it weighs.

An *op* is what one kernel call computes in the engine: ``qkv_proj`` (q, k and v share an input and are
fused), ``o_proj``, ``gate_up_proj`` (fused) and ``down_proj`` of each decoder layer, and ``lm_head``.
Quantization configs speak of Hugging Face linears (``model.layers.3.self_attn.q_proj``); this module
maps one to the other and sizes them.
"""
from __future__ import annotations

import dataclasses
import random
from typing import Iterable, Sequence

# op -> the Hugging Face linears (relative to a decoder layer) it covers
OP_LINEARS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    "o_proj": ("self_attn.o_proj",),
    "gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
    "down_proj": ("mlp.down_proj",),
}
LM_HEAD = "lm_head"
OPS = (*OP_LINEARS, LM_HEAD)
PRECISIONS = ("int4", "int8", "bf16")
LAYERS_PREFIX = "model.layers"


@dataclasses.dataclass(frozen=True)
class OpRef:
    """One op of the model: ``layer`` is None for ``lm_head``."""

    layer: int | None
    op: str

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"unknown op {self.op!r}; expected one of {OPS}")
        if (self.layer is None) != (self.op == LM_HEAD):
            raise ValueError("lm_head has no layer index; every other op needs one")

    def linear_names(self) -> tuple[str, ...]:
        """Full Hugging Face names of the linears this op covers."""
        if self.op == LM_HEAD:
            return (LM_HEAD,)
        return tuple(f"{LAYERS_PREFIX}.{self.layer}.{name}" for name in OP_LINEARS[self.op])

    def key(self) -> str:
        return self.op if self.layer is None else f"{self.layer}.{self.op}"


def decoder_ops(num_layers: int) -> list[OpRef]:
    """Every decoder op, layer by layer (``lm_head`` excluded: it is tied to the embedding and not quantized)."""
    return [OpRef(layer, op) for layer in range(num_layers) for op in OP_LINEARS]


def op_weight_bytes(shapes: Sequence[tuple[int, int]], precision: str, group_size: int = 64) -> int:
    """Run-time bytes of an op's weights ([N, K] per linear) at ``precision``: bf16 2 bytes per weight;
    int8 1 byte plus a float32 scale per row; symmetric int4 half a byte plus a float32 scale per group."""
    total = 0
    for rows, cols in shapes:
        if precision == "bf16":
            total += 2 * rows * cols
        elif precision == "int8":
            total += rows * cols + 4 * rows
        elif precision == "int4":
            total += rows * cols // 2 + 4 * rows * (cols // group_size)
        else:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    return total


def linear_precisions(plan: dict[OpRef, str]) -> dict[str, str]:
    """Expand an op plan to the linear names a ``QuantConfig.precisions`` takes."""
    return {name: precision for ref, precision in plan.items() for name in ref.linear_names()}


def budget_plan(ranking: Sequence[OpRef], shapes: dict[OpRef, list[tuple[int, int]]], budget: float) -> list[OpRef]:
    """The most sensitive ops (in ``ranking`` order) whose bf16 weights fit in ``budget`` of all the ops'
    bf16 bytes; an op that does not fit is skipped and smaller ones further down may still be taken."""
    if not 0.0 <= budget <= 1.0:
        raise ValueError(f"bf16 budget must be a fraction in [0, 1], got {budget}")
    return _take_fitting(ranking, shapes, budget * sum(op_weight_bytes(s, "bf16") for s in shapes.values()))


def random_plan(ops: Iterable[OpRef], shapes: dict[OpRef, list[tuple[int, int]]], target_bytes: int,
                seed: int) -> list[OpRef]:
    """A random choice of ops whose bf16 bytes add up to at most ``target_bytes`` (the control for a
    sensitivity-chosen set of the same size): ops in a seeded random order, each taken if it fits."""
    order = list(ops)
    random.Random(seed).shuffle(order)
    return _take_fitting(order, shapes, target_bytes)


def _take_fitting(order: Iterable[OpRef], shapes: dict[OpRef, list[tuple[int, int]]], limit: float) -> list[OpRef]:
    """Walk ``order`` and take each op whose bf16 bytes still fit under ``limit``."""
    chosen, used = [], 0
    for ref in order:
        size = op_weight_bytes(shapes[ref], "bf16")
        if used + size <= limit:
            chosen.append(ref)
            used += size
    return chosen


def parse_op_key(key: str) -> OpRef:
    """``"12.down_proj"`` -> OpRef(12, "down_proj"); ``"lm_head"`` -> OpRef(None, "lm_head")."""
    if key == LM_HEAD:
        return OpRef(None, LM_HEAD)
    layer, _, op = key.partition(".")
    if not layer.isdigit():
        raise ValueError(f"op key must look like '12.down_proj' or 'lm_head', got {key!r}")
    return OpRef(int(layer), op)


def op_shapes(model, ops: Iterable[OpRef]) -> dict[OpRef, list[tuple[int, int]]]:
    """[N, K] of each linear of each op in a Hugging Face-named ``model``."""
    return {ref: [tuple(model.get_submodule(name).weight.shape) for name in ref.linear_names()] for ref in ops}

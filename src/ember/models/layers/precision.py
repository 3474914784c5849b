"""The runtime precision mask: linears holding a quantized and a high-precision copy of one op
(``DualPrecisionLinear``), the per-step row mask that picks between them (``PrecisionMask``), and
``attach_fallback_copies``, which turns a loaded model's quantized linears into dual ones."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn

from ember.kernels.linear.registry import KernelPolicy
from ember.models.layers.linear import DenseLinear
from ember.quant.linear import QuantLinear


@dataclass(frozen=True)
class RowSplit:
    """Rows of one call that take the dense path; ``quantized_rows`` None means every row does.

    With at most as many dense rows as quantized ones (``overwrite``) the quantized half runs on every
    row and the dense rows of its output are overwritten: the quantized rows come out exactly as in a
    call with no dense row (the same kernel for the same row count), and the step skips selecting and
    placing them. With more dense rows each half runs on its own rows only.
    """

    dense_rows: torch.Tensor  # [num_dense] int64
    quantized_rows: torch.Tensor | None  # [num_quantized] int64

    @property
    def overwrite(self) -> bool:
        return self.quantized_rows is not None and len(self.dense_rows) <= len(self.quantized_rows)


class PrecisionMask:
    """Which rows of one step's batch take the high-precision path of which ops.

    Built by the model runner for each step and passed down the forward call; never stored by a
    layer. Rows are grouped by the op set their request was admitted with: a row of a group takes
    the dense path of op ``name`` iff ``name`` is in the group's ops. The split of each distinct
    group membership pattern is computed once per step and shared by every layer with that pattern.

    Args:
        num_rows: rows (tokens) of the step.
        groups: (op names, bool row mask [num_rows]) pairs; empty ones are dropped.
    """

    def __init__(self, num_rows: int, groups: Iterable[tuple[frozenset[str], torch.Tensor]]) -> None:
        self.num_rows = num_rows
        self.groups = [(ops, rows) for ops, rows in groups if ops and bool(rows.any())]
        self._splits: dict[tuple[bool, ...], RowSplit | None] = {}

    @classmethod
    def from_spans(cls, num_rows: int,
                   spans: Iterable[tuple[frozenset[str], int, int]]) -> "PrecisionMask | None":
        """A mask from (op names, first row, end row) spans of dense rows; None when no row is dense."""
        groups: dict[frozenset[str], torch.Tensor] = {}
        for ops, start, end in spans:
            if ops and end > start:
                rows = groups.setdefault(ops, torch.zeros(num_rows, dtype=torch.bool))
                rows[start:end] = True
        mask = cls(num_rows, groups.items())
        return mask if mask.groups else None

    def select(self, rows: list[int]) -> "PrecisionMask | None":
        """The mask of a sub-batch made of ``rows`` (e.g. the rows the LM head runs on)."""
        index = torch.tensor(rows, dtype=torch.int64)
        mask = PrecisionMask(len(rows), [(ops, mask[index]) for ops, mask in self.groups])
        return mask if mask.groups else None

    def split_for(self, op_name: str) -> RowSplit | None:
        """How a call of op ``op_name`` splits its rows; None when every row stays quantized."""
        key = tuple(op_name in ops for ops, _ in self.groups)
        if key not in self._splits:
            self._splits[key] = self._split(key)
        return self._splits[key]

    def _split(self, key: tuple[bool, ...]) -> RowSplit | None:
        dense = torch.zeros(self.num_rows, dtype=torch.bool)
        for (_, rows), uses_dense in zip(self.groups, key):
            if uses_dense:
                dense |= rows
        num_dense = int(dense.sum())
        if num_dense == 0:
            return None
        dense_rows = dense.nonzero().squeeze(1)
        if num_dense == self.num_rows:
            return RowSplit(dense_rows, None)
        return RowSplit(dense_rows, (~dense).nonzero().squeeze(1))


class DualPrecisionLinear(nn.Module):
    """One op with a quantized and a high-precision ("bf16") copy of its weight; each row of a call
    takes the path its ``PrecisionMask`` names, so one batch mixes precisions without copying weights.

    No dense row: the quantized call only. All dense: the dense call only. Mixed: the dense half runs
    its own rows (index_select in, index_copy out); the quantized half runs every row when dense rows are
    the fewer (``RowSplit.overwrite``: its rows come out as with no dense row), else its own rows only.

    Args:
        quantized: the served quantized layer.
        dense: the same op's float weight behind the dense kernels (in the model's dtype).
        op_name: the module name of this layer in the model (what the mask is asked about).
        match_names: every name an op pattern may use for this layer (its own, the Hugging Face names
            of its fused parts, the fused name of the op it is part of).
    """

    accepts_precision_mask = True  # apply_linear passes it the step's mask

    def __init__(self, quantized: QuantLinear, dense: DenseLinear, op_name: str,
                 match_names: tuple[str, ...] = ()) -> None:
        super().__init__()
        if (dense.in_features, dense.out_features) != (quantized.in_features, quantized.out_features):
            raise ValueError(f"{op_name}: dense copy is {dense.out_features}x{dense.in_features}, the quantized "
                             f"layer {quantized.out_features}x{quantized.in_features}")
        self.quantized, self.dense = quantized, dense
        self.in_features, self.out_features = quantized.in_features, quantized.out_features
        self.op_name = op_name
        self.match_names = tuple(dict.fromkeys((op_name, *match_names)))

    def forward(self, x: torch.Tensor, mask: PrecisionMask | None = None) -> torch.Tensor:
        """x [num_rows, in_features] -> [num_rows, out_features]; rows are those of ``mask``."""
        split = mask.split_for(self.op_name) if mask is not None else None
        if split is None:
            return self.quantized(x)
        if split.quantized_rows is None:
            return self.dense(x)
        if split.overwrite:
            out = self.quantized(x)
        else:
            quantized_out = self.quantized(x.index_select(0, split.quantized_rows))
            out = quantized_out.new_empty(x.shape[0], self.out_features)
            out.index_copy_(0, split.quantized_rows, quantized_out)
        return out.index_copy_(0, split.dense_rows, self.dense(x.index_select(0, split.dense_rows)))

    def extra_repr(self) -> str:
        return f"op={self.op_name}"


def apply_linear(layer: nn.Module, x: torch.Tensor, mask: PrecisionMask | None) -> torch.Tensor:
    """Call any linear of the model; only layers that take the step's mask (dual-precision ones and the
    wrappers around them) are given it."""
    if mask is None or not getattr(layer, "accepts_precision_mask", False):
        return layer(x)
    return layer(x, mask)


def dual_layers(model: nn.Module) -> dict[str, DualPrecisionLinear]:
    """The model's dual-precision layers by op name."""
    return {m.op_name: m for m in model.modules() if isinstance(m, DualPrecisionLinear)}


def attach_fallback_copies(model: nn.Module, float_weights: Mapping[str, torch.Tensor], dtype: torch.dtype,
                           policy: KernelPolicy | None = None) -> int:
    """Give the named quantized linears of a loaded ember model a high-precision copy (a dual layer).

    Works on the finished model, after q/k/v and gate/up were fused (bfloat16): a fused QuantLinear
    (`qkv_proj`, `gate_up_proj`, per the model's `packed_modules_mapping`) gets the concatenation of
    its parts' float weights, and needs all of them. The float weights must be in the basis the
    checkpoint's quantized weights are in (a rotated checkpoint needs rotated copies).

    Args:
        model: a loaded ember model (`QuantLinear`s in place).
        float_weights: float weight [out, in] per Hugging Face linear name (`model.layers.3.mlp.down_proj`;
            a `.weight` suffix is accepted); a fused layer also takes its stacked copy under its own name
            (`model.layers.3.self_attn.qkv_proj`).
        dtype: the model's activation dtype; the copies are stored and their kernels prepared in it.
        policy: kernel policy of the dense copies; default: each quantized layer's own.

    Returns:
        How many dual layers were made (names of layers that are already dual or already float are skipped).

    Raises:
        ValueError: a name that is no linear of the model, a fused layer given only some of its
            parts, a shape mismatch, or a quantized layer with a bias. Nothing is changed then.
    """
    weights = {name.removesuffix(".weight"): tensor for name, tensor in float_weights.items()}
    plan, used = _plan_copies(model, weights)
    known = used | _float_linear_names(model)
    unknown = sorted(set(weights) - known)
    if unknown:
        raise ValueError(f"{len(unknown)} float copies name no quantized linear of the model, e.g. {unknown[:3]}")
    layers = [(name, _build_dual(model.get_submodule(name), name, sources, aliases, weights, dtype, policy))
              for name, sources, aliases in plan]
    for name, layer in layers:
        model.set_submodule(name, layer)
    return len(layers)


def _plan_copies(model: nn.Module,
                 weights: dict[str, torch.Tensor]) -> tuple[list[tuple[str, list[str], tuple[str, ...]]], set[str]]:
    """(layer name, the float weights to stack, all its match names) per quantized layer to make dual;
    the weight names used."""
    mapping: dict[str, list[str]] = getattr(model, "packed_modules_mapping", {})
    duals = dual_layers(model)
    used = {n for layer in duals.values() for n in layer.match_names}
    plan = []
    for name, module in model.named_modules():
        if type(module) is not QuantLinear or any(name.startswith(d + ".") for d in duals):
            continue
        prefix, _, leaf = name.rpartition(".")
        parts = [f"{prefix}.{p}" for p in mapping[leaf]] if leaf in mapping else [name]
        present = [p for p in parts if p in weights]
        sources = [name] if name in weights else present  # a fused layer's stacked copy, or its parts'
        if not sources:
            continue
        if sources == present and len(present) != len(parts):
            missing = sorted(set(parts) - set(present))
            raise ValueError(f"{name} is fused from {parts}: float copies of {missing} are missing")
        packed = [f"{prefix}.{fused}" for fused, members in mapping.items() if leaf in members]
        plan.append((name, sources, (*parts, *packed)))
        used.update(sources)
    return plan, used


def _float_linear_names(model: nn.Module) -> set[str]:
    """Names (and HF part names) of linears that already run in high precision."""
    mapping: dict[str, list[str]] = getattr(model, "packed_modules_mapping", {})
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, DenseLinear)):
            prefix, _, leaf = name.rpartition(".")
            names.update([name, *(f"{prefix}.{p}" for p in mapping.get(leaf, ()))])
    return names


def _build_dual(quantized: QuantLinear, name: str, sources: list[str], match_names: tuple[str, ...],
                weights: dict[str, torch.Tensor], dtype: torch.dtype,
                policy: KernelPolicy | None) -> DualPrecisionLinear:
    """The dual layer of one quantized layer; its dense half's kernels are prepared for ``dtype``."""
    if quantized.bias is not None:
        raise ValueError(f"{name}: dual-precision layers support bias-free linears only")
    # [N, K]; a single copy already in `dtype` is shared, not copied (e.g. a checkpoint's fallback_weight)
    weight = weights[sources[0]] if len(sources) == 1 else torch.cat([weights[p] for p in sources])
    weight = weight.detach().to(device="cpu", dtype=dtype)
    if tuple(weight.shape) != (quantized.out_features, quantized.in_features):
        raise ValueError(f"{name}: float copy has shape {tuple(weight.shape)}, the layer "
                         f"[{quantized.out_features}, {quantized.in_features}]")
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    dense = DenseLinear(linear, policy or quantized.policy)
    dense.prepare_kernels(dtype)
    return DualPrecisionLinear(quantized, dense, name, match_names)

"""Decode steps of a Llama-form model through one native call for all its decoder layers.

At batch 1 a 4-bit model's kernels take ~5.5 ms a step and the Python between them (module calls,
reshapes, each linear's dispatch) another ~2 ms. The core extension's ``DecodeLayers`` runs the same
kernels in the same order on the same operands, so its output is bit for bit the modules' output; this
module decides when that holds and hands it the operands:

- the model: every layer is the plain form (fused qkv and gate/up projections, SiLU, no q/k norms,
  window, softcap, MoE or LoRA), bfloat16, and every linear's kernel for the step's token count has a
  native entry (``LinearKernel.native``: W4A8; the W8A8 GEMV; bf16 GEMV, pair panels, AMX bf16, oneDNN
  bf16; weight-only int8 GEMV, int8 / int4 dpbf16 and torch's packed int4 / int8) with its bias fused or
  absent;
- the step: every token decodes (no prefill chunk), no attention recording, one KV-cache group of
  bfloat16 blocks or of int8 codes with per-token scales and no residuals; under a precision mask a
  dual-precision linear whose rows split runs each half's kernel on its own rows, as the module does;
- nothing the loop was built from was swapped since (checked every step; a change rebuilds it), and no
  forward hook is registered on the modules it stands in for.

Anything else runs the modules. ``EMBER_DISABLE_NATIVE_DECODE=1`` turns the loop off.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from ember import envs
from ember.attention.layer_cache import DenseLayerCache, Int8LayerCache
from ember.attention.metadata import AttentionMetadata
from ember.kernels.linear.module import KernelLinear
from ember.kernels.ops import core_ops, quant_ops
from ember.models.layers.mlp import GatedMLP
from ember.models.layers.norm import RMSNorm
from ember.models.layers.precision import DualPrecisionLinear, PrecisionMask

# (parent attribute, linear) of each layer's four linears, in DecodeLayers.add_layer's order
LINEARS = (("self_attn", "qkv_proj"), ("self_attn", "o_proj"), ("mlp", "gate_up_proj"), ("mlp", "down_proj"))
ALL_DENSE = "dense"  # a row-split pattern entry: the mask sends every row of this linear to its dense copy
MAX_LOOPS = 64  # loops kept; beyond it the ones built for a precision mask are dropped


class _Loop(NamedTuple):
    """A DecodeLayers (None: the modules run these steps) and what it was built from."""

    layers: object | None
    kv_caches: list
    witnesses: list[tuple]  # (container, key, object) that must still hold
    modules: list[nn.Module]  # the modules among the witnessed objects, whose hooks are checked


class NativeDecode:
    """The native decode loops of one model, one per token count and pattern of row splits (each linear's
    kernel depends on how many rows it gets).

    A loop keeps what it was built from as (container, key, object) triples: the layers' modules, the norm
    weights, each linear's kernel plan and policy, the caches. Every step checks that they are all still
    in place and unhooked; otherwise the loop is rebuilt (or the modules run the step).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._loops: dict[tuple, _Loop] = {}  # by (token count, row-split pattern)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_caches: list,
                meta: AttentionMetadata, precision: PrecisionMask | None) -> torch.Tensor | None:
        """The last decoder layer's output for a plain decode step, or None when the modules must run it."""
        num_tokens = x.shape[0]
        if (not num_tokens or envs.EMBER_DISABLE_NATIVE_DECODE or meta.prefills
                or meta.num_decode_tokens != num_tokens or meta.groups or meta.attention_mass is not None
                or x.dtype != torch.bfloat16):
            return None
        pattern, row_splits = self._row_splits(precision) if precision is not None else ((), [])
        key = (num_tokens, pattern)
        loop = self._loops.get(key)
        if loop is None or not _intact(loop, kv_caches):
            if pattern and len(self._loops) >= MAX_LOOPS:  # masks come and go: keep the plain loops
                self._loops = {k: v for k, v in self._loops.items() if not k[1]}
            loop = self._loops[key] = self._build(num_tokens, kv_caches, pattern)
        if loop.layers is None or _hooked(loop.modules):  # a hook must see the modules run
            return None
        cos, sin = rope
        return loop.layers.forward(x, cos, sin, meta.slot_mapping, meta.decode_block_tables, meta.decode_seq_lens,
                                   row_splits)

    def _row_splits(self, precision: PrecisionMask) -> tuple[tuple, list[torch.Tensor]]:
        """How the step's mask splits each linear's rows: a pattern with one entry per linear (None: every row
        quantized or not a dual layer, ALL_DENSE, or (split number, dense rows, `RowSplit.overwrite`); empty
        when nothing splits), and the dense and quantized row indices of each split number."""
        pattern, row_splits, numbers = [], [], {}
        for layer in self.model.model.layers:
            for parent, name in LINEARS:
                linear = getattr(getattr(layer, parent, None), name, None)
                split = precision.split_for(linear.op_name) if isinstance(linear, DualPrecisionLinear) else None
                if split is None:
                    pattern.append(None)
                elif split.quantized_rows is None:
                    pattern.append(ALL_DENSE)
                else:
                    if id(split) not in numbers:
                        numbers[id(split)] = len(numbers)
                        row_splits += [split.dense_rows, split.quantized_rows]
                    pattern.append((numbers[id(split)], len(split.dense_rows), split.overwrite))
        if all(entry is None for entry in pattern):  # no dual layer splits: the plain loop
            return (), []
        return tuple(pattern), row_splits

    def _build(self, num_tokens: int, kv_caches: list, pattern: tuple) -> _Loop:
        witnesses: list[tuple] = []
        layers = self._assemble(num_tokens, kv_caches, pattern, witnesses)
        return _Loop(layers, kv_caches, witnesses, [obj for _, _, obj in witnesses if isinstance(obj, nn.Module)])

    def _assemble(self, num_tokens: int, kv_caches: list, pattern: tuple, witnesses: list[tuple]):
        """A DecodeLayers over every layer for calls of `num_tokens` rows split as `pattern` says (empty: no
        split), or None when some part is not the plain form or a kernel has no native entry; what it is
        built from goes into `witnesses`."""
        ops = core_ops()
        layers = self.model.model.layers
        if ops is None or not hasattr(ops, "DecodeLayers") or len(kv_caches) != len(layers):
            return None
        first = layers[0].self_attn
        quant = quant_ops()
        loop = ops.DecodeLayers(first.num_heads, first.num_kv_heads, first.head_dim, layers[0].input_layernorm.eps,
                                first.scale, getattr(quant, "c_api", None))
        for i, (layer, cache) in enumerate(zip(layers, kv_caches)):
            splits = pattern[len(LINEARS) * i:len(LINEARS) * (i + 1)] if pattern else (None,) * len(LINEARS)
            parts = _layer_parts(layer, cache, num_tokens, splits, first, witnesses)
            if parts is None:
                return None
            loop.add_layer(*parts)
        return loop


def _intact(loop: _Loop, kv_caches: list) -> bool:
    """Whether the caches and every (container, key, object) the loop was built from still hold."""
    return loop.kv_caches is kv_caches and all(container.get(key) is obj for container, key, obj in loop.witnesses)


def _hooked(modules: list[nn.Module]) -> bool:
    """Whether a forward hook is registered globally or on a module the loop stands in for."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


def _layer_parts(layer: nn.Module, cache, num_tokens: int, splits: tuple, first: nn.Module,
                 witnesses: list[tuple]):
    """add_layer's arguments for one decoder layer whose linears split their rows as `splits` says (one
    `_row_splits` pattern entry each), or None when it is not the plain form; records what the arguments
    came from in `witnesses`."""
    attn, mlp = layer.self_attn, getattr(layer, "mlp", None)
    norms = (getattr(layer, "input_layernorm", None), getattr(layer, "post_attention_layernorm", None))
    for parent in (layer, attn, mlp):
        if isinstance(parent, nn.Module):
            witnesses += [(parent._modules, name, module) for name, module in parent._modules.items()]
    if not (type(mlp) is GatedMLP and mlp.is_silu and mlp.gate_up_proj is not None
            and getattr(attn, "qkv_proj", None) is not None and attn.q_norm is None
            and attn.sliding_window is None and attn.logit_softcap is None
            and (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.scale)
            == (first.num_heads, first.num_kv_heads, first.head_dim, first.scale)
            and all(type(norm) is RMSNorm and norm.weight.dtype == torch.bfloat16
                    and norm.eps == norms[0].eps for norm in norms)
            and cache.group == 0):
        return None
    tensors = _cache_tensors(cache)
    if tensors is None:
        return None
    witnesses += [(norm._parameters, "weight", norm.weight) for norm in norms]
    witnesses += [(vars(cache), name, getattr(cache, name)) for name in ("key", "value")]
    linears, halves = [], []
    for (parent, name), split in zip(LINEARS, splits):
        calls = _native_calls(getattr(getattr(layer, parent), name), num_tokens, split, witnesses)
        if calls is None:
            return None
        linears.append(calls[0])
        halves.append(calls[1])
    return norms[0].weight, norms[1].weight, tensors, linears, halves


def _cache_tensors(cache) -> list[torch.Tensor] | None:
    """What the loop reads and writes of a layer's cache: bf16 K and V, or an int8 cache's kernel tensors when
    it is written per token without residuals (the native write); None for anything else."""
    if type(cache) is DenseLayerCache and cache.key.dtype == torch.bfloat16:
        return [cache.key, cache.value]
    if (type(cache) is Int8LayerCache and cache.dtype == torch.bfloat16
            and cache.key.native_write is not None and cache.value.native_write is not None):
        return [*cache.key.kernel_args, *cache.value.kernel_args]
    return None


def _native_calls(linear: nn.Module, num_tokens: int, split, witnesses: list[tuple]):
    """(the linear's call, its dense half) for `num_tokens` rows split as `split` says, add_layer's entries;
    None when a kernel has no native entry. A dual layer runs its quantized copy on every row (no split),
    its dense copy on every row (ALL_DENSE), or both as `DualPrecisionLinear.forward` does ((split number,
    dense rows, overwrite): the quantized copy on every row or on the quantized rows, the dense copy on the
    dense rows)."""
    no_half = (-1, False, "", [], 0)
    if not isinstance(linear, DualPrecisionLinear):
        call = _native_call(linear, num_tokens, witnesses)
        return None if call is None else (call, no_half)
    witnesses.append((linear._modules, "quantized", linear.quantized))
    witnesses.append((linear._modules, "dense", linear.dense))
    if split is None:
        call = _native_call(linear.quantized, num_tokens, witnesses)
        return None if call is None else (call, no_half)
    if split == ALL_DENSE:
        call = _native_call(linear.dense, num_tokens, witnesses)
        return None if call is None else (call, no_half)
    number, num_dense, overwrite = split
    call = _native_call(linear.quantized, num_tokens if overwrite else num_tokens - num_dense, witnesses)
    dense = _native_call(linear.dense, num_dense, witnesses)
    return None if call is None or dense is None else (call, (number, overwrite, *dense))


def _native_call(linear: nn.Module, num_tokens: int, witnesses: list[tuple]):
    if not isinstance(linear, KernelLinear):
        return None
    call = linear.native_call(num_tokens, torch.bfloat16)
    witnesses += [(vars(linear), "policy", linear.policy), (vars(linear), "_plans", linear._plans),
                  (linear._plans, (num_tokens, torch.bfloat16), linear._plans.get((num_tokens, torch.bfloat16)))]
    return call

"""Decode steps of a Llama-form model through one native call for all its decoder layers.

At batch 1 a 4-bit model's kernels take ~5.5 ms a step and the Python between them (module calls,
reshapes, each linear's dispatch) another ~2 ms. The core extension's ``DecodeLayers`` runs the same
kernels in the same order on the same operands, so its output is bit for bit the modules' output; this
module decides when that holds and hands it the operands:

- the model: every layer is the plain form (fused qkv and gate/up projections, SiLU, no q/k norms,
  window, softcap, MoE or LoRA), bfloat16, and every linear's kernel for the step's token count has a
  native entry (``LinearKernel.native``: W4A8, bf16 GEMV, AMX bf16, oneDNN bf16) with its bias fused or
  absent;
- the step: every token decodes (no prefill chunk), no precision mask, no attention recording, one
  KV-cache group of bfloat16 blocks or of int8 codes with per-token scales and no residuals;
- nothing the loop was built from was swapped since (checked every step; a change rebuilds it), and no
  forward hook is registered on the modules it stands in for.

Anything else runs the modules. ``EMBER_DISABLE_NATIVE_DECODE=1`` turns the loop off.
"""

from __future__ import annotations

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


class NativeDecode:
    """The native decode loops of one model, one per token count (each linear's kernel depends on it).

    A loop keeps what it was built from as (container, key, object) triples: the layers' modules, the norm
    weights, each linear's kernel plan and policy, the caches. Every step checks that they are all still
    in place and unhooked; otherwise the loop is rebuilt (or the modules run the step).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self._loops: dict[int, tuple[object | None, list[tuple], list[nn.Module]]] = {}  # tokens -> (DecodeLayers,
        # its witnesses, the modules among them)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_caches: list,
                meta: AttentionMetadata, precision: PrecisionMask | None) -> torch.Tensor | None:
        """The last decoder layer's output for a plain decode step, or None when the modules must run it."""
        num_tokens = x.shape[0]
        if (not num_tokens or precision is not None or envs.EMBER_DISABLE_NATIVE_DECODE or meta.prefills
                or meta.num_decode_tokens != num_tokens or meta.groups or meta.attention_mass is not None
                or x.dtype != torch.bfloat16):
            return None
        loop, witnesses, modules = self._loops.get(num_tokens, (None, None, None))
        if witnesses is None or not _intact(witnesses, kv_caches):
            loop, witnesses = self._build(num_tokens, kv_caches)
            modules = [obj for _, _, obj in witnesses if isinstance(obj, nn.Module)]
            self._loops[num_tokens] = loop, witnesses, modules
        if loop is None or _hooked(modules):  # a hook must see the modules run
            return None
        cos, sin = rope
        return loop.forward(x, cos, sin, meta.slot_mapping, meta.decode_block_tables, meta.decode_seq_lens)

    def _build(self, num_tokens: int, kv_caches: list) -> tuple[object | None, list[tuple]]:
        """A DecodeLayers over every layer for calls of `num_tokens` rows (None when some part is not the
        plain form or its kernel has no native entry), and what it depends on."""
        witnesses: list[tuple] = [(kv_caches, None, None)]
        ops = core_ops()
        if ops is None or not hasattr(ops, "DecodeLayers"):
            return None, witnesses
        layers = self.model.model.layers
        first = layers[0].self_attn
        quant = quant_ops()
        loop = ops.DecodeLayers(first.num_heads, first.num_kv_heads, first.head_dim, layers[0].input_layernorm.eps,
                                first.scale, getattr(quant, "c_api", None))
        for layer, cache in zip(layers, kv_caches):
            parts = _layer_parts(layer, cache, num_tokens, first, witnesses)
            if parts is None:
                return None, witnesses
            loop.add_layer(*parts)
        return (loop if loop.num_layers == len(layers) else None), witnesses


def _intact(witnesses: list[tuple], kv_caches: list) -> bool:
    """Whether every (container, key, object) a loop was built from still holds."""
    return witnesses[0][0] is kv_caches and all(container.get(key) is obj for container, key, obj in witnesses[1:])


def _hooked(modules: list[nn.Module]) -> bool:
    """Whether a forward hook is registered globally or on a module the loop stands in for."""
    hooks = nn.modules.module
    return bool(hooks._global_forward_hooks or hooks._global_forward_pre_hooks) or any(
        m._forward_hooks or m._forward_pre_hooks for m in modules)


def _layer_parts(layer: nn.Module, cache, num_tokens: int, first: nn.Module, witnesses: list[tuple]):
    """add_layer's arguments for one decoder layer, or None when it is not the plain form; records what the
    arguments came from in `witnesses`."""
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
    linears = []
    for parent, name in LINEARS:
        call = _native_call(getattr(getattr(layer, parent), name), num_tokens, witnesses)
        if call is None:
            return None
        linears.append(call)
    return norms[0].weight, norms[1].weight, tensors, linears


def _cache_tensors(cache) -> list[torch.Tensor] | None:
    """What the loop reads and writes of a layer's cache: bf16 K and V, or an int8 cache's kernel tensors when
    it is written per token without residuals (the native write); None for anything else."""
    if type(cache) is DenseLayerCache and cache.key.dtype == torch.bfloat16:
        return [cache.key, cache.value]
    if (type(cache) is Int8LayerCache and cache.dtype == torch.bfloat16
            and cache.key.native_write is not None and cache.value.native_write is not None):
        return [*cache.key.kernel_args, *cache.value.kernel_args]
    return None


def _native_call(linear: nn.Module, num_tokens: int, witnesses: list[tuple]):
    if isinstance(linear, DualPrecisionLinear):  # with no precision mask, only its quantized copy runs
        witnesses.append((linear._modules, "quantized", linear.quantized))
        linear = linear.quantized
    if not isinstance(linear, KernelLinear):
        return None
    call = linear.native_call(num_tokens, torch.bfloat16)
    witnesses += [(vars(linear), "policy", linear.policy), (vars(linear), "_plans", linear._plans),
                  (linear._plans, (num_tokens, torch.bfloat16), linear._plans.get((num_tokens, torch.bfloat16)))]
    return call

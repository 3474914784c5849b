"""`LoRAManager`: wraps a model's adaptable linears, keeps up to `max_loras` adapters resident in their
slots, and tells the layers which rows of each step use which slot."""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch
from torch import nn

from ember.lora.adapter import LoRAAdapter, load_peft_adapter
from ember.lora.layers import LoRABatch, LoRALinear
from ember.lora.request import LoRARequest
from ember.models.config import ModelConfig

ADAPTABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class _Resident:
    request: LoRARequest
    cache_key: int  # unique per load: the prefix cache never mixes KV of two loads
    last_used: int


class LoRAManager:
    """Adapter slots of one model.

    Args:
        model: the finished model (kernels chosen, projections possibly fused); its q/k/v/o and
            gate/up/down linears are wrapped in `LoRALinear`s in place.
        max_loras: adapters resident at once (slots); a step may mix all of them.
        max_lora_rank: the largest adapter rank accepted (smaller ranks are zero-padded).
    """

    def __init__(self, model: nn.Module, model_config: ModelConfig, max_loras: int, max_lora_rank: int,
                 dtype: torch.dtype) -> None:
        self.max_loras, self.max_lora_rank, self.dtype = max_loras, max_lora_rank, dtype
        self.batch = LoRABatch(max_loras, max_lora_rank)
        self._targets = _wrap_model(model, model_config, self.batch, dtype)  # HF name -> (layer, slice)
        self._slots: list[_Resident | None] = [None] * max_loras
        self._loads = itertools.count(1)

    def activate(self, request: LoRARequest, busy_slots: set[int]) -> tuple[int, int]:
        """(slot, cache key) of `request`'s adapter, loading it into a free slot, or into the least
        recently used one no live request holds. A name loaded before from another path or id is
        reloaded in place when no live request uses it.

        Raises:
            ValueError: the adapter cannot be read or does not fit this model, its name is in use with
                another path or id, or every slot holds an adapter that live requests use.
        """
        stamp = next(self._loads)
        slot = self._slot_of(request.lora_name)
        if slot is not None:
            resident = self._slots[slot]
            if (resident.request.lora_int_id, resident.request.lora_path) == (request.lora_int_id,
                                                                                request.lora_path):
                resident.last_used = stamp
                return slot, resident.cache_key
            if slot in busy_slots:
                raise ValueError(f"LoRA adapter {request.lora_name!r} is running with another id or path")
        adapter = self.read(request)
        slot = slot if slot is not None else self._free_slot(busy_slots)
        self._write(slot, adapter)
        self._slots[slot] = _Resident(request, stamp, stamp)
        return slot, stamp

    def release(self, lora_name: str, busy_slots: set[int]) -> None:
        """Free the adapter's slot now if no live request uses it (else LRU reuse frees it later)."""
        slot = self._slot_of(lora_name)
        if slot is not None and slot not in busy_slots:
            self._write(slot, None)
            self._slots[slot] = None

    def _slot_of(self, lora_name: str) -> int | None:
        return next((slot for slot, resident in enumerate(self._slots)
                     if resident is not None and resident.request.lora_name == lora_name), None)

    def read(self, request: LoRARequest) -> LoRAAdapter:
        """Read the request's PEFT directory and check that the adapter fits this model (ValueError if not):
        rank within `max_lora_rank`, only modules this model adapts."""
        adapter = load_peft_adapter(request.lora_path, request.lora_name)
        if adapter.rank > self.max_lora_rank:
            raise ValueError(f"LoRA adapter {adapter.name!r} has rank {adapter.rank}, above max_lora_rank "
                             f"{self.max_lora_rank}")
        unknown = sorted(set(adapter.weights) - set(self._targets))
        if unknown:
            raise ValueError(f"LoRA adapter {adapter.name!r} targets modules this model cannot adapt "
                             f"(only {', '.join(ADAPTABLE)}): {unknown[:3]}")
        return adapter

    def set_batch(self, num_rows: int, spans: list[tuple[int, int, int]]) -> None:
        """(slot, first row, end row) of the rows of the next forward that use an adapter."""
        self.batch.set_rows(num_rows, spans, self.dtype)

    def _free_slot(self, busy_slots: set[int]) -> int:
        free = [slot for slot, resident in enumerate(self._slots) if resident is None]
        if free:
            return free[0]
        idle = [slot for slot in range(self.max_loras) if slot not in busy_slots]
        if not idle:
            raise ValueError(f"all {self.max_loras} LoRA slots hold adapters that running requests use; "
                             "retry later or raise max_loras")
        return min(idle, key=lambda slot: self._slots[slot].last_used)

    def _write(self, slot: int, adapter: LoRAAdapter | None) -> None:
        pairs: dict[LoRALinear, list] = {}
        for name, (layer, index) in self._targets.items():
            parts = pairs.setdefault(layer, [None] * len(layer.slice_sizes))
            if adapter is not None and name in adapter.weights:
                parts[index] = adapter.weights[name]
        for layer, parts in pairs.items():
            layer.set_slot(slot, parts)


def _wrap_model(model: nn.Module, config: ModelConfig, batch: LoRABatch,
                dtype: torch.dtype) -> dict[str, tuple[LoRALinear, int]]:
    """Wrap every adaptable linear; map each Hugging Face module name to (its wrapper, slice index)."""
    packed = getattr(model, "packed_modules_mapping", {})
    targets: dict[str, tuple[LoRALinear, int]] = {}
    for name, module in list(model.named_modules()):
        parent_name, _, attr = name.rpartition(".")
        parts = packed.get(attr, [attr] if attr in ADAPTABLE else None)
        if parts is None or isinstance(module, LoRALinear):
            continue
        layer = LoRALinear(module, _slice_sizes(attr, module, config), batch, dtype)
        model.get_submodule(parent_name).register_module(attr, layer)
        for index, part in enumerate(parts):
            targets[f"{parent_name}.{part}"] = (layer, index)
    return targets


def _slice_sizes(attr: str, module: nn.Module, config: ModelConfig) -> list[int]:
    """Output widths of the projections a (possibly fused) linear stacks."""
    out_features = module.out_features
    if attr == "qkv_proj":
        kv = config.num_key_value_heads * config.head_dim
        return [config.num_attention_heads * config.head_dim, kv, kv]
    if attr == "gate_up_proj":
        return [out_features // 2, out_features // 2]
    return [out_features]

"""Read a PEFT LoRA adapter directory (`adapter_config.json` + `adapter_model.safetensors`)."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file

_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoRAAdapter:
    """One adapter's low-rank pairs by Hugging Face module name (e.g. `model.layers.0.self_attn.q_proj`).

    Each pair is (A [r, in_features], B [out_features, r]) with the adapter's scaling folded into B,
    so the module's output gains `x @ A.T @ B.T` (Hu et al., 2021: W + (alpha / r) B A).
    """

    name: str
    rank: int
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def load_peft_adapter(path: str, name: str) -> LoRAAdapter:
    """Parse the adapter at `path`.

    Raises:
        ValueError: no adapter_config.json or adapter_model.safetensors there, a PEFT option this engine does not run (DoRA, trained biases, modules_to_save,
            embedding LoRA, per-module ranks or alphas) or tensors that do not pair up.
    """
    config = _read_config(path)
    scaling = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    file = os.path.join(path, "adapter_model.safetensors")
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} has no adapter_model.safetensors")
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(file).items():
        module, _, kind = key.removeprefix(_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight"):
            raise ValueError(f"{name}: unsupported adapter tensor {key!r} (only lora_A/lora_B of linears)")
        pairs.setdefault(module, {})[kind[0]] = tensor.float()
    weights = {}
    for module, pair in pairs.items():
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
            raise ValueError(f"{name}: {module} lacks a matching lora_A/lora_B pair")
        weights[module] = (pair["A"], pair["B"] * scaling)
    if not weights:
        raise ValueError(f"{name}: the adapter holds no LoRA weights")
    return LoRAAdapter(name, int(config["r"]), weights)


def _read_config(path: str) -> dict:
    file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(file):
        raise ValueError(f"{path!r} is not a PEFT adapter directory (no adapter_config.json)")
    with open(file) as f:
        config = json.load(f)
    refused = {"peft_type": config.get("peft_type", "LORA") != "LORA", "use_dora": config.get("use_dora"),
               "bias": config.get("bias", "none") != "none", "modules_to_save": config.get("modules_to_save"),
               "fan_in_fan_out": config.get("fan_in_fan_out"), "rank_pattern": config.get("rank_pattern"),
               "alpha_pattern": config.get("alpha_pattern"), "lora_bias": config.get("lora_bias"),
               "target_parameters": config.get("target_parameters"),
               "layer_replication": config.get("layer_replication"),
               "trainable_token_indices": config.get("trainable_token_indices"),
               "alora_invocation_tokens": config.get("alora_invocation_tokens")}
    unsupported = [key for key, bad in refused.items() if bad]
    if unsupported:
        raise ValueError(f"adapter {path!r}: unsupported PEFT options {unsupported} (plain LoRA on linears only)")
    return config

"""Quantized checkpoint directory: ``model.safetensors`` + ``quantization_config.json`` (+ ``config.json``)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ember.kernels.linear.registry import KernelPolicy
from ember.quant.config import QuantConfig
from ember.quant.linear import QuantLinear

WEIGHTS_NAME = "model.safetensors"
QUANT_CONFIG_NAME = "quantization_config.json"


def save_quantized(model: nn.Module, directory: str | Path, config: QuantConfig,
                   drift_reference: dict[str, Any] | None = None) -> Path:
    """Write the model's state (packed codes, scales, float remainder) and its quantization config.

    ``drift_reference`` (the calibrated activation histogram of per-request precision fallback,
    ``ember.engine.drift.DriftReference.to_dict()``) is stored in the JSON when given.

    Tensors sharing storage (tied embeddings) are stored once; ``tied`` in the JSON maps each alias
    to the stored name. A Hugging Face ``model.config`` is written as ``config.json`` when present.
    Returns the directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    tied: dict[str, str] = {}
    owners: dict[tuple[int, int, tuple[int, ...]], str] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if key in owners and tensor.numel():
            tied[name] = owners[key]
            continue
        owners[key] = name
        tensors[name] = tensor.detach().contiguous()
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "ember-quant"})
    quantized = sorted(n for n, m in model.named_modules() if isinstance(m, QuantLinear))
    precisions = {n: config.precision_of(n) for n in quantized}
    precisions.update({n: p for n, p in config.precisions.items() if p == "bf16"})
    payload = dict(config.to_dict(), quantized_modules=quantized, tied=tied, module_precisions=precisions)
    if drift_reference is not None:
        payload["drift_reference"] = drift_reference
    (directory / QUANT_CONFIG_NAME).write_text(json.dumps(payload, indent=2, sort_keys=True))
    hf_config = getattr(model, "config", None)
    if hf_config is not None and hasattr(hf_config, "to_json_file"):
        hf_config.to_json_file(str(directory / "config.json"))
    return directory


def load_quantized_state(directory: str | Path) -> tuple[QuantConfig, list[str], dict[str, torch.Tensor]]:
    """Read a quantized checkpoint: (config, quantized module names, state dict with tied aliases restored).

    Raises:
        FileNotFoundError: if either file is missing. ValueError: on an unknown format.
    """
    directory = Path(directory)
    payload: dict[str, Any] = json.loads((directory / QUANT_CONFIG_NAME).read_text())
    quantized = list(payload.pop("quantized_modules", []))
    payload.pop("drift_reference", None)
    tied = dict(payload.pop("tied", {}))
    config = QuantConfig.from_dict(payload)
    state = load_file(str(directory / WEIGHTS_NAME))
    for alias, owner in tied.items():
        state[alias] = state[owner]
    return config, quantized, state


def load_quantized(model: nn.Module, directory: str | Path, policy: KernelPolicy | None = None) -> QuantConfig:
    """Swap the checkpoint's quantized modules into ``model`` (a float skeleton) and load every tensor.

    The skeleton must have the same architecture (e.g. built from the saved ``config.json``).
    Returns the checkpoint's ``QuantConfig``.
    """
    config, quantized, state = load_quantized_state(directory)
    for name in quantized:
        linear = model.get_submodule(name)
        scheme = config.scheme_for(name)
        if scheme is None:
            raise ValueError(f"{name} is listed as quantized but its precision is bf16")
        layer = QuantLinear(linear.in_features, linear.out_features, scheme, act_bits=config.act_bits_for(name),
                            bias=f"{name}.bias" in state, policy=policy,
                            has_fallback=f"{name}.fallback_weight" in state,
                            num_float_channels=state[f"{name}.channel_index"].numel()
                            if f"{name}.channel_index" in state else 0)
        model.set_submodule(name, layer)
    if config.rotate and isinstance(getattr(model, "lm_head", None), nn.Linear):
        # rotated checkpoints carry their own lm_head; never re-tie it to the embedding
        model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    model.load_state_dict(state, strict=True)
    return config


def load_drift_reference(directory: str | Path) -> dict[str, Any] | None:
    """The calibrated drift reference a checkpoint carries (for precision fallback), or None."""
    path = Path(directory) / QUANT_CONFIG_NAME
    if not path.is_file():
        return None
    payload = json.loads(path.read_text())
    return payload.get("drift_reference")

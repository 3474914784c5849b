"""Read a Hugging Face model directory: config.json and *.safetensors weights."""

from __future__ import annotations

import glob
import os

import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from ember.loader.expert_weights import stack_expert_weights
from ember.models.config import ModelConfig
from ember.progress import LOAD_DELAY_S, progress as progress_bar


def load_hf_dir(path: str, progress: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Return the model config and the state dict (as stored) of a local HF directory.

    ``progress``: a bar over the weight files once loading has taken over ``LOAD_DELAY_S`` (``ember.progress``).
    """
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    config = ModelConfig.from_hf_config(AutoConfig.from_pretrained(path))
    state: dict[str, torch.Tensor] = {}
    for file in progress_bar(files, desc="loading weights", unit="file", enabled=progress, delay=LOAD_DELAY_S):
        state.update(load_file(file))
    return config, stack_expert_weights(state)

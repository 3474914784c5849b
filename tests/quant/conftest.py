"""Fixtures of the quantization tests: a tiny random Llama and calibration batches."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaForCausalLM

from quant_models import make_tiny_llama


@pytest.fixture
def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama()


@pytest.fixture
def calib_batches() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (2, 32), generator=gen) for _ in range(4)]

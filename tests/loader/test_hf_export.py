"""Weights read by ember's loaders hand over to transformers unchanged."""

import torch

from ember.loader.hf_export import to_hf_model
from ember.loader.model_loader import load_state


def test_to_hf_model_equals_loading_the_directory(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    config, state = load_state(tiny_llama_dir)
    ours = to_hf_model(config, state)
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    ids = torch.randint(3, 512, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        assert torch.equal(ours(ids).logits, reference(ids).logits)

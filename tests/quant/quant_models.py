"""Tiny randomly initialised Hugging Face Llama models for the quantization tests (no hub access)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def make_tiny_llama(hidden: int = 128, heads: int = 4, kv_heads: int = 2, intermediate: int = 256,
                    layers: int = 2, vocab: int = 256, tied: bool = True, seed: int = 0) -> LlamaForCausalLM:
    """A float32 Llama with non-trivial norm gains and a few outlier input channels, like trained models."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=256, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(torch.rand_like(param) + 0.5)
                param[:4] *= 8.0  # outlier channels in the normed activations
    return model

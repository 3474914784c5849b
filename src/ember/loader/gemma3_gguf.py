"""Gemma 3 in llama.cpp's GGUF conventions: metadata -> `ModelConfig` (with llama.cpp's defaults for what the
file leaves out), tensor names -> Hugging Face names, and norm weights back to Hugging Face's zero-centred form."""

from __future__ import annotations

from typing import Any, Callable

import numpy as np

from ember.models.config import ModelConfig
from ember.models.gemma3 import SLIDING

# GGUF tensor name (per layer, after "blk.N.") -> Hugging Face parameter name.
LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_q_norm.weight": "self_attn.q_norm.weight",
    "attn_k_norm.weight": "self_attn.k_norm.weight",
    "post_attention_norm.weight": "post_attention_layernorm.weight",
    "ffn_norm.weight": "pre_feedforward_layernorm.weight",
    "post_ffw_norm.weight": "post_feedforward_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}

# What llama.cpp assumes when the file is silent: every 6th layer global, local RoPE base 10000.
DEFAULT_SLIDING_WINDOW_PATTERN = 6
DEFAULT_ROPE_LOCAL_THETA = 10_000.0
GEMMA3_27B_LAYERS = 62  # llama.cpp scales queries by (hidden / heads) ** -0.5 for the 27B, else head_dim ** -0.5


def read_gemma3_config(field: Callable[..., Any], tensor_names: set[str], vocab_size: int) -> ModelConfig:
    """The config of a `gemma3` GGUF; `field(key, default=None)` reads one metadata value.

    Raises:
        NotImplementedError: the file asks for RoPE scaling (the 4B and larger models).
    """
    def arch(key: str, default=None):
        return field(f"gemma3.{key}", default)

    scaling = arch("rope.scaling.type", "none")
    if scaling not in ("none", None):
        raise NotImplementedError(f"Gemma 3 with rope scaling {scaling!r} is not supported")
    num_layers, hidden, heads = int(arch("block_count")), int(arch("embedding_length")), int(arch("attention.head_count"))
    head_dim = int(arch("attention.key_length", hidden // heads))
    return ModelConfig(
        architecture="gemma3", vocab_size=vocab_size, hidden_size=hidden,
        intermediate_size=int(arch("feed_forward_length")), num_hidden_layers=num_layers,
        num_attention_heads=heads, num_key_value_heads=int(arch("attention.head_count_kv", heads)),
        head_dim=head_dim, rms_norm_eps=float(arch("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_theta=float(arch("rope.freq_base", 1_000_000.0)),
        max_position_embeddings=int(arch("context_length", 32768)),
        tie_word_embeddings="output.weight" not in tensor_names,
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"),
        hidden_activation="gelu_pytorch_tanh",
        layer_types=_layer_types(num_layers, arch("attention.sliding_window_pattern", DEFAULT_SLIDING_WINDOW_PATTERN)),
        sliding_window=int(arch("attention.sliding_window")),
        rope_local_theta=float(arch("rope.freq_base_swa", DEFAULT_ROPE_LOCAL_THETA)),
        query_pre_attn_scalar=hidden // heads if num_layers == GEMMA3_27B_LAYERS else head_dim,
        attn_logit_softcapping=arch("attn_logit_softcapping"),
        final_logit_softcapping=arch("final_logit_softcapping"),
    )


def _layer_types(num_layers: int, pattern) -> tuple[str, ...]:
    """Per-layer types from a period (layer i is global when (i + 1) % period == 0) or a per-layer flag list."""
    if isinstance(pattern, (list, tuple)):
        flags = [bool(flag) for flag in pattern]
    else:
        flags = [(i + 1) % int(pattern) != 0 for i in range(num_layers)]
    return tuple(SLIDING if is_local else "full_attention" for is_local in flags)


def to_hf_weight(gguf_name: str, weight: np.ndarray) -> np.ndarray:
    """llama.cpp's converter stores every Gemma norm weight as 1 + w; Hugging Face keeps w."""
    return weight - 1.0 if gguf_name.endswith("norm.weight") else weight

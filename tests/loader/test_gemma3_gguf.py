"""Gemma 3 GGUF metadata -> ModelConfig with llama.cpp's defaults, and its norm-weight convention."""

import numpy as np
import pytest

from ember.loader.gemma3_gguf import read_gemma3_config, to_hf_weight

METADATA_270M = {  # the keys the Gemma-3-270M GGUF carries
    "gemma3.context_length": 32768, "gemma3.embedding_length": 640, "gemma3.block_count": 18,
    "gemma3.feed_forward_length": 2048, "gemma3.attention.head_count": 4, "gemma3.attention.head_count_kv": 1,
    "gemma3.attention.key_length": 256, "gemma3.attention.layer_norm_rms_epsilon": 1e-6,
    "gemma3.rope.freq_base": 1e6, "gemma3.attention.sliding_window": 512,
    "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
}


def _config(**overrides):
    metadata = {**METADATA_270M, **overrides}
    return read_gemma3_config(lambda key, default=None: metadata.get(key, default), {"token_embd.weight"}, 262144)


def test_270m_metadata_with_llama_cpp_defaults():
    config = _config()
    assert (config.head_dim, config.sliding_window, config.tie_word_embeddings) == (256, 512, True)
    # every 6th layer global; local RoPE base 10000; queries scaled by head_dim ** -0.5
    assert [i for i, t in enumerate(config.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert (config.rope_theta, config.rope_local_theta, config.query_pre_attn_scalar) == (1e6, 10000.0, 256)
    assert config.hidden_activation == "gelu_pytorch_tanh" and config.final_logit_softcapping is None


def test_explicit_pattern_swa_base_and_27b_scale():
    flags = [True, False] * 9  # llama.cpp's per-layer form: True = sliding
    config = _config(**{"gemma3.attention.sliding_window_pattern": flags, "gemma3.rope.freq_base_swa": 5e4})
    assert config.layer_types[:2] == ("sliding_attention", "full_attention") and config.rope_local_theta == 5e4
    big = _config(**{"gemma3.block_count": 62, "gemma3.embedding_length": 5376, "gemma3.attention.head_count": 32,
                     "gemma3.attention.key_length": 128})
    assert big.query_pre_attn_scalar == 5376 // 32  # llama.cpp's rule for the 27B


def test_rope_scaling_is_refused():
    with pytest.raises(NotImplementedError, match="rope scaling"):
        _config(**{"gemma3.rope.scaling.type": "linear"})


def test_norm_weights_lose_llama_cpp_offset():
    weight = np.array([1.5, 0.25], dtype=np.float32)
    np.testing.assert_array_equal(to_hf_weight("blk.0.attn_q_norm.weight", weight), [0.5, -0.75])
    np.testing.assert_array_equal(to_hf_weight("blk.0.attn_q.weight", weight), weight)

"""Hand ember's loaded weights to a `transformers` model (for calibration-based tools)."""

from __future__ import annotations

import torch

from ember.models.config import ModelConfig


def to_hf_model(config: ModelConfig, state: dict[str, torch.Tensor]):
    """A float32 `transformers.LlamaForCausalLM` holding `state` (Hugging Face names).

    Raises:
        NotImplementedError: the model is not of the plain Llama form (biases, q/k norms, experts).
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    if config.architecture != "llama":
        raise NotImplementedError(f"calibration tools (quantize, analyze) run on Llama-architecture models; "
                                  f"{config.architecture!r} is not supported by them yet")

    hf_config = LlamaConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_key_value_heads,
        head_dim=config.head_dim, rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta,
        max_position_embeddings=config.max_position_embeddings,
        tie_word_embeddings=config.tie_word_embeddings, bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_config)
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(f"weights do not fit the architecture: missing {missing[:3]}, unexpected {unexpected[:3]}")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_config)  # its buffers were on meta
    return model.float().eval()

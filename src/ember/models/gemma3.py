"""Gemma 3, text only (Hugging Face's Gemma3ForCausalLM) over the paged KV cache: interleaved sliding-window
(local) and global attention layers, each with its own RoPE base, GeGLU MLPs and four norms per layer."""

from __future__ import annotations

import torch
from torch import nn

from ember.attention.layer_cache import LayerCache
from ember.attention.metadata import AttentionMetadata
from ember.models.config import ModelConfig
from ember.models.layers.attention import SelfAttention
from ember.models.layers.mlp import GatedMLP
from ember.models.layers.norm import GemmaRMSNorm
from ember.models.layers.precision import PrecisionMask, apply_linear
from ember.models.layers.rotary import RotaryEmbedding
from ember.models.llama import LlamaForCausalLM

SLIDING = "sliding_attention"


class Gemma3DecoderLayer(nn.Module):
    """x + post_norm(attn(pre_norm(x))), then x + post_norm(mlp(pre_norm(x))); local layers see only the
    last `sliding_window` keys."""

    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        hidden, head_dim, eps = config.hidden_size, config.head_dim, config.rms_norm_eps
        self.is_sliding = bool(config.layer_types) and config.layer_types[layer_id] == SLIDING
        scalar = config.query_pre_attn_scalar or head_dim
        # The attention cap applies when a config sets it, as in vLLM; transformers' Gemma 3 ignores it, and
        # every released Gemma 3 leaves it null (QK-norm replaced Gemma 2's capping).
        self.self_attn = SelfAttention(hidden, config.num_attention_heads, config.num_key_value_heads, head_dim,
                                       qk_norm_eps=eps, scale=scalar ** -0.5,
                                       sliding_window=config.sliding_window if self.is_sliding else None,
                                       logit_softcap=config.attn_logit_softcapping)
        # Gemma's per-head q/k norms scale by 1 + weight, like its other norms.
        self.self_attn.q_norm = GemmaRMSNorm(head_dim, eps)
        self.self_attn.k_norm = GemmaRMSNorm(head_dim, eps)
        self.mlp = GatedMLP(hidden, config.intermediate_size, config.hidden_activation)
        self.input_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_attention_layernorm = GemmaRMSNorm(hidden, eps)
        self.pre_feedforward_layernorm = GemmaRMSNorm(hidden, eps)
        self.post_feedforward_layernorm = GemmaRMSNorm(hidden, eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: LayerCache,
                meta: AttentionMetadata, precision: PrecisionMask | None = None) -> torch.Tensor:
        attn = self.self_attn(self.input_layernorm(x), rope, kv_cache, meta, precision)
        x = x + self.post_attention_layernorm(attn)
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x), precision))


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        positions = config.max_position_embeddings
        self.rotary = RotaryEmbedding(config.head_dim, positions, config.rope_theta)  # global layers
        self.rotary_local = RotaryEmbedding(config.head_dim, positions, config.rope_local_theta)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = GemmaRMSNorm(config.hidden_size, config.rms_norm_eps)


class Gemma3ForCausalLM(nn.Module):
    """Parameter names follow Hugging Face, so state dicts load by name; the head is tied to the embedding
    when the config says so (every Gemma 3)."""

    packed_modules_mapping = LlamaForCausalLM.packed_modules_mapping
    load_weights = LlamaForCausalLM.load_weights  # the same adoption by Hugging Face name, tied head included

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Gemma3Model(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerCache],
                meta: AttentionMetadata, precision: PrecisionMask | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden_size]."""
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        # Embeddings are scaled by sqrt(hidden), the factor rounded to the model dtype as the reference does.
        x = x * torch.tensor(self.config.hidden_size ** 0.5, dtype=x.dtype)
        ropes = {False: self.model.rotary(positions, x.dtype), True: self.model.rotary_local(positions, x.dtype)}
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, ropes[layer.is_sliding], kv_cache, meta, precision)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor, precision: PrecisionMask | None = None) -> torch.Tensor:
        """[N, hidden_size] -> float32 logits [N, vocab_size], soft-capped when the config says so."""
        logits = apply_linear(self.lm_head, hidden, precision).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap


def gemma3_config_from_hf(hf_config) -> ModelConfig:
    """A `ModelConfig` from a `transformers` Gemma3TextConfig (the rope_parameters of transformers 5, or the
    rope_theta / rope_local_base_freq attributes of earlier versions).

    Raises:
        NotImplementedError: RoPE scaling, attention biases or bidirectional attention.
    """
    rope = getattr(hf_config, "rope_parameters", None) or {}
    full, local = rope.get("full_attention") or {}, rope.get("sliding_attention") or {}
    scaling = getattr(hf_config, "rope_scaling", None) or {}
    for params in (full, local, scaling):
        if params.get("rope_type", params.get("type", "default")) != "default":
            raise NotImplementedError(f"rope scaling {params!r} is not supported")
    if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "use_bidirectional_attention", False):
        raise NotImplementedError("Gemma 3 with attention biases or bidirectional attention is not supported")
    eos = hf_config.eos_token_id
    return ModelConfig(
        architecture="gemma3", vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size, num_hidden_layers=hf_config.num_hidden_layers,
        num_attention_heads=hf_config.num_attention_heads, num_key_value_heads=hf_config.num_key_value_heads,
        head_dim=hf_config.head_dim, rms_norm_eps=hf_config.rms_norm_eps,
        rope_theta=float(full.get("rope_theta", getattr(hf_config, "rope_theta", 1_000_000.0))),
        max_position_embeddings=hf_config.max_position_embeddings,
        tie_word_embeddings=bool(hf_config.tie_word_embeddings), bos_token_id=hf_config.bos_token_id,
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        hidden_activation=hf_config.hidden_activation, layer_types=tuple(hf_config.layer_types),
        sliding_window=hf_config.sliding_window,
        rope_local_theta=float(local.get("rope_theta", getattr(hf_config, "rope_local_base_freq", 10_000.0))),
        query_pre_attn_scalar=hf_config.query_pre_attn_scalar,
        attn_logit_softcapping=hf_config.attn_logit_softcapping,
        final_logit_softcapping=hf_config.final_logit_softcapping,
    )

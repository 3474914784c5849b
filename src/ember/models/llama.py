"""The Llama-form decoder over the paged KV cache: Llama 2/3, SmolLM2, Mistral-style GQA, Qwen2 (q/k/v
biases), Qwen3 (per-head q/k norms), and their sparse-MoE forms Mixtral and Qwen2/Qwen3-MoE, which
differ from it only in the options `ModelConfig` carries."""

from __future__ import annotations

import torch
from torch import nn

from ember.attention.layer_cache import LayerCache
from ember.attention.metadata import AttentionMetadata
from ember.models.config import ModelConfig
from ember.models.layers.attention import SelfAttention
from ember.models.layers.mlp import GatedMLP
from ember.models.layers.moe import SparseMoeBlock
from ember.models.layers.norm import RMSNorm
from ember.models.layers.precision import PrecisionMask, apply_linear
from ember.models.layers.rotary import RotaryEmbedding
from ember.models.native_decode import NativeDecode

class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = SelfAttention(config.hidden_size, config.num_attention_heads,
                                       config.num_key_value_heads, config.head_dim, qkv_bias=config.qkv_bias,
                                       o_proj_bias=config.o_proj_bias,
                                       qk_norm_eps=config.rms_norm_eps if config.qk_norm else None)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = _mlp(config, layer_id)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: LayerCache,
                meta: AttentionMetadata, precision: PrecisionMask | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, kv_cache, meta, precision)
        return x + self.mlp(self.post_attention_layernorm(x), precision)


def _mlp(config: ModelConfig, layer_id: int) -> nn.Module:
    """The layer's feed-forward block: sparse MoE in the layers the config names, else dense SwiGLU."""
    if layer_id in config.moe_layers:
        return SparseMoeBlock(config.hidden_size, config.num_experts, config.num_experts_per_tok,
                              config.moe_intermediate_size, config.norm_topk_prob,
                              config.shared_expert_intermediate_size)
    return GatedMLP(config.hidden_size, config.intermediate_size)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.rotary = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow Hugging Face, so state dicts load by name."""

    # fused module -> the Hugging Face linears it stacks (vLLM's name for the same map)
    packed_modules_mapping = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"]}

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.native_decode = NativeDecode(self)  # a plain object: no parameters, not in the state dict

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[LayerCache],
                meta: AttentionMetadata, precision: PrecisionMask | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, hidden_size].

        `precision` (the step's row mask, None: every row quantized) reaches every dual-precision linear.
        """
        x = self.model.embed_tokens(input_ids)
        rope = self.model.rotary(positions, x.dtype)  # shared by every layer
        native = self.native_decode.forward(x, rope, kv_caches, meta, precision)  # None: not a plain decode step
        if native is not None:
            return self.model.norm(native)
        for layer, kv_cache in zip(self.model.layers, kv_caches):
            x = layer(x, rope, kv_cache, meta, precision)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor, precision: PrecisionMask | None = None) -> torch.Tensor:
        """[N, hidden_size] -> float32 logits [N, vocab_size]; `precision` is the mask of these N rows."""
        return apply_linear(self.lm_head, hidden, precision).float()

    def load_weights(self, state: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
        """Adopt a Hugging Face-named state dict (converted to `dtype`); every parameter must be present.

        Parameters are replaced, not copied into, so the model may have been built on the meta device.
        """
        params = dict(self.named_parameters())  # tied weights appear once, as embed_tokens
        missing = [name for name in params if name not in state]
        if missing:
            raise ValueError(f"checkpoint lacks {len(missing)} parameters, e.g. {missing[:3]}")
        for name, param in params.items():
            tensor = state[name]
            if tensor.shape != param.shape:
                raise ValueError(f"{name}: checkpoint shape {tuple(tensor.shape)} != model "
                                 f"shape {tuple(param.shape)}")
            module_name, _, attr = name.rpartition(".")
            setattr(self.get_submodule(module_name), attr,
                    nn.Parameter(tensor.to(dtype), requires_grad=False))
        if self.config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

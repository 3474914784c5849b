"""Architecture hyper-parameters of a loaded model, independent of the file format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a decoder-only transformer (Hugging Face names)."""

    architecture: str  # a MODEL_REGISTRY key: "llama", "qwen2", "qwen3", "mixtral", "qwen2_moe", "qwen3_moe"
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    qkv_bias: bool = False  # q/k/v projections add a bias (Qwen2)
    o_proj_bias: bool = False  # the output projection adds one too (Qwen3 with attention_bias)
    qk_norm: bool = False  # RMSNorm over each head of q and k before RoPE (Qwen3)
    num_experts: int = 0  # routed experts of a sparse MoE block; 0: every MLP is dense
    num_experts_per_tok: int = 0  # top-k experts per token
    moe_intermediate_size: int = 0  # each routed expert's hidden width
    norm_topk_prob: bool = True  # renormalise the top-k router probabilities to sum to 1
    shared_expert_intermediate_size: int = 0  # Qwen2-MoE's always-on expert behind a sigmoid gate; 0: none
    moe_layers: tuple[int, ...] = ()  # indices of the layers whose MLP is the sparse MoE block
    # Gemma 3 (the defaults are the Llama form: SiLU, every layer global, head_dim ** -0.5, no caps)
    hidden_activation: str = "silu"  # the gated MLP's activation: "silu" or "gelu_pytorch_tanh" (GeGLU)
    layer_types: tuple[str, ...] = ()  # per layer "sliding_attention" or "full_attention"; (): all full
    sliding_window: int | None = None  # keys a sliding-attention layer sees, the query's own included
    rope_local_theta: float = 10000.0  # RoPE base of the sliding-attention layers
    query_pre_attn_scalar: float | None = None  # attention scale = this ** -0.5 (None: head_dim ** -0.5)
    attn_logit_softcapping: float | None = None  # attention scores -> cap * tanh(scores / cap)
    final_logit_softcapping: float | None = None  # logits -> cap * tanh(logits / cap)

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")
        if self.moe_layers and not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok ({self.num_experts_per_tok}) must be in 1..num_experts "
                             f"({self.num_experts})")
        if self.layer_types and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError(f"layer_types names {len(self.layer_types)} layers, the model has {self.num_hidden_layers}")
        if "sliding_attention" in self.layer_types and not (self.sliding_window or 0) > 0:
            raise ValueError(f"sliding-attention layers need a positive sliding_window, got {self.sliding_window}")

    @classmethod
    def from_hf_config(cls, hf_config) -> "ModelConfig":
        """Build from a `transformers.PretrainedConfig` of a supported architecture."""
        model_type = hf_config.model_type
        if model_type == "gemma3_text":  # its own reader: two RoPE bases, layer types, caps
            from ember.models.gemma3 import gemma3_config_from_hf  # the model module imports this one
            return gemma3_config_from_hf(hf_config)
        if model_type not in HF_ARCHITECTURES:
            raise NotImplementedError(f"model type {model_type!r} is not supported "
                                      f"(supported: {', '.join(sorted(HF_ARCHITECTURES))})")
        _check_supported(hf_config)
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        rope_theta = getattr(hf_config, "rope_theta", None)
        if rope_theta is None:  # newer transformers keep it in rope_parameters
            rope_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        eos = hf_config.eos_token_id
        return cls(
            architecture=HF_ARCHITECTURES[model_type], vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size, intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=hf_config.num_hidden_layers, num_attention_heads=heads,
            num_key_value_heads=hf_config.num_key_value_heads or heads,
            head_dim=head_dim, rms_norm_eps=hf_config.rms_norm_eps, rope_theta=float(rope_theta),
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            bos_token_id=hf_config.bos_token_id,
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
            **_attention_options(model_type, hf_config), **_moe_options(model_type, hf_config),
        )


# Hugging Face model_type -> the MODEL_REGISTRY key of the class that runs it
HF_ARCHITECTURES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3",
                    "mixtral": "mixtral", "qwen2_moe": "qwen2_moe", "qwen3_moe": "qwen3_moe"}


def _check_supported(hf_config) -> None:
    """Refuse the options this engine does not implement rather than run them wrongly."""
    rope_scaling = getattr(hf_config, "rope_scaling", None) or getattr(hf_config, "rope_parameters", None)
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type not in ("default", None):
        raise NotImplementedError(f"rope scaling {rope_type!r} is not supported")
    if getattr(hf_config, "mlp_bias", False):
        raise NotImplementedError("MLP biases are not supported")
    if hf_config.model_type in ("llama", "mistral") and getattr(hf_config, "attention_bias", False):
        raise NotImplementedError("attention biases are not supported for Llama")
    window = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", False) or (
            hf_config.model_type in ("mistral", "mixtral") and window and window < hf_config.max_position_embeddings):
        raise NotImplementedError("sliding-window attention is not supported for this architecture")
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        raise NotImplementedError(f"activation {hf_config.hidden_act!r} is not supported (supported: silu)")


def _attention_options(model_type: str, hf_config) -> dict:
    if model_type == "qwen2":  # q/k/v always carry a bias in Qwen2
        return {"qkv_bias": True}
    if model_type == "qwen2_moe":
        return {"qkv_bias": bool(getattr(hf_config, "qkv_bias", True))}
    if model_type in ("qwen3", "qwen3_moe"):
        bias = bool(getattr(hf_config, "attention_bias", False))
        return {"qkv_bias": bias, "o_proj_bias": bias, "qk_norm": True}
    return {}


def _moe_options(model_type: str, hf_config) -> dict:
    """Router and expert shapes; which layers are sparse follows each family's rule."""
    num_layers = hf_config.num_hidden_layers
    if model_type == "mixtral":  # every layer sparse, experts as wide as the dense MLP, top-k renormalised
        return {"num_experts": hf_config.num_local_experts, "num_experts_per_tok": hf_config.num_experts_per_tok,
                "moe_intermediate_size": hf_config.intermediate_size, "norm_topk_prob": True,
                "moe_layers": tuple(range(num_layers))}
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step, dense = hf_config.decoder_sparse_step, set(hf_config.mlp_only_layers or ())
        layers = tuple(i for i in range(num_layers)
                       if hf_config.num_experts > 0 and i not in dense and (i + 1) % step == 0)
        return {"num_experts": hf_config.num_experts, "num_experts_per_tok": hf_config.num_experts_per_tok,
                "moe_intermediate_size": hf_config.moe_intermediate_size,
                "norm_topk_prob": bool(hf_config.norm_topk_prob), "moe_layers": layers,
                "shared_expert_intermediate_size": getattr(hf_config, "shared_expert_intermediate_size", 0) or 0}
    return {}

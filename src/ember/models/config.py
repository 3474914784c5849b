"""Architecture hyper-parameters of a loaded model, independent of the file format."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelConfig:
    """Shapes and constants of a decoder-only transformer (Hugging Face names)."""

    architecture: str  # e.g. "llama"
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

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                             f"num_key_value_heads ({self.num_key_value_heads})")

    @classmethod
    def from_hf_config(cls, hf_config) -> "ModelConfig":
        """Build from a `transformers.PretrainedConfig` of a supported architecture."""
        model_type = hf_config.model_type
        if model_type not in ("llama", "mistral", "qwen2"):
            raise NotImplementedError(f"model type {model_type!r} is not supported (supported: llama)")
        rope_scaling = getattr(hf_config, "rope_scaling", None)
        rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
        if rope_type not in ("default", None):
            raise NotImplementedError(f"rope scaling {rope_type!r} is not supported")
        if getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False):
            raise NotImplementedError("attention/MLP biases are not supported")
        heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads
        rope_theta = getattr(hf_config, "rope_theta", None)
        if rope_theta is None:  # newer transformers keep it in rope_parameters
            rope_theta = (getattr(hf_config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
        eos = hf_config.eos_token_id
        return cls(
            architecture="llama", vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size, num_hidden_layers=hf_config.num_hidden_layers,
            num_attention_heads=heads, num_key_value_heads=hf_config.num_key_value_heads or heads,
            head_dim=head_dim, rms_norm_eps=hf_config.rms_norm_eps, rope_theta=float(rope_theta),
            max_position_embeddings=hf_config.max_position_embeddings,
            tie_word_embeddings=bool(hf_config.tie_word_embeddings),
            bos_token_id=hf_config.bos_token_id,
            eos_token_id=eos[0] if isinstance(eos, list) else eos,
        )

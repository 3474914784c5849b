"""Static per-channel KV-cache scales ("C8-S"): calibrated by running text through the paged model,
stored as `kv_scales.safetensors` (its own directory or inside a quantized checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ember.attention.kv_quant import INT8_MAX
from ember.attention.layer_cache import DenseLayerCache, KVCacheSpec

KV_SCALES_NAME = "kv_scales.safetensors"


class AbsmaxRecorder(DenseLayerCache):
    """A dense layer cache that also keeps the running |max| of every written K and V channel, [KVH, D].

    Keys are recorded as the cache stores them: after the rotary embedding.
    """

    def __init__(self, num_blocks: int, spec: KVCacheSpec) -> None:
        super().__init__(num_blocks, spec)
        self.key_absmax = torch.zeros(spec.num_kv_heads, spec.head_dim)
        self.value_absmax = torch.zeros(spec.num_kv_heads, spec.head_dim)

    def write(self, k: torch.Tensor, v: torch.Tensor, slot_mapping: torch.Tensor) -> None:
        super().write(k, v, slot_mapping)
        torch.maximum(self.key_absmax, k.float().abs().amax(0), out=self.key_absmax)
        torch.maximum(self.value_absmax, v.float().abs().amax(0), out=self.value_absmax)


@torch.inference_mode()
def calibrate_kv_scales(model, batches: list[torch.Tensor], block_size: int = 16,
                        progress: bool = False) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (k_scale, v_scale), each [KVH, D] = the channel's |max| over the batches / 127.

    Args:
        model: an Ember causal LM (`models/`), run through its paged forward.
        batches: [1, seq_len] token ids each (calibration text, never the evaluation split).
        progress: a bar over the batches (stderr, terminal only: ``ember.progress``).
    """
    from ember.eval.perplexity import model_cache_spec, window_logits
    from ember.progress import progress as progress_bar

    longest = max(batch.shape[-1] for batch in batches)
    spec = model_cache_spec(model, "auto", block_size)
    recorders = [AbsmaxRecorder(-(-longest // block_size), spec) for _ in range(spec.num_layers)]
    for batch in progress_bar(batches, desc="kv calibration", unit="batch", enabled=progress):
        window_logits(model, batch.flatten().tolist(), caches=recorders)
    return [(r.key_absmax.clamp_min(1e-6) / INT8_MAX, r.value_absmax.clamp_min(1e-6) / INT8_MAX) for r in recorders]


def save_kv_scales(directory: str | Path, scales: list[tuple[torch.Tensor, torch.Tensor]], metadata: dict) -> Path:
    """Write `kv_scales.safetensors` into `directory` (created if missing); returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for i, (k_scale, v_scale) in enumerate(scales):
        tensors[f"layers.{i}.k_scale"] = k_scale.float().contiguous()
        tensors[f"layers.{i}.v_scale"] = v_scale.float().contiguous()
    path = directory / KV_SCALES_NAME
    save_file(tensors, str(path), metadata={"ember": json.dumps(metadata)})
    return path


def load_kv_scales(path: str | Path) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """The per-layer scales in `path` (the file or a directory holding it); None when there is none."""
    path = Path(path)
    if path.is_dir():
        path = path / KV_SCALES_NAME
    if not path.is_file():
        return None
    tensors = load_file(str(path))
    num_layers = len([name for name in tensors if name.endswith(".k_scale")])
    try:
        return [(tensors[f"layers.{i}.k_scale"], tensors[f"layers.{i}.v_scale"]) for i in range(num_layers)]
    except KeyError as err:
        raise ValueError(f"{path} lacks {err.args[0]}: not a kv_scales file written by `ember calibrate-kv`") from None


def resolve_kv_scales(cache_dtype: str, kv_scales: str | None, model_path: str) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
    """int8-static's scales from `kv_scales` (a file or directory), else the model's directory; None for
    other cache dtypes.

    Raises:
        ValueError: int8-static and no scales found.
    """
    if cache_dtype != "int8-static":
        return None
    source = kv_scales or (model_path if Path(model_path).is_dir() else None)
    scales = load_kv_scales(source) if source else None
    if scales is None:
        raise ValueError(f"kv_cache_dtype int8-static needs calibrated KV scales; none found at "
                         f"{source or model_path}: run `ember calibrate-kv --output DIR` and pass --kv-scales DIR")
    return scales

"""Perplexity of a model on a text, with sliding windows (each token scored once, with context)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.attention.layer_cache import KVCacheSpec, create_layer_caches
from ember.attention.metadata import build_attention_metadata
from ember.progress import progress as progress_bar


@dataclass
class PerplexityResult:
    perplexity: float
    num_tokens: int  # tokens scored
    nll_sum: float
    window: int
    stride: int

    def to_dict(self) -> dict:
        return {"perplexity": self.perplexity, "num_tokens": self.num_tokens, "nll": self.nll_sum / self.num_tokens,
                "window": self.window, "stride": self.stride}


def window_logits(model, token_ids: list[int], caches: list | None = None, chunk_size: int | None = None,
                  block_size: int = 16) -> torch.Tensor:
    """Logits at every position of one fresh sequence, through the paged model.

    Args:
        caches: per-layer caches (`attention.layer_cache`) whose blocks 0, 1, ... hold the sequence;
            default: scratch caches in the model dtype. Their block size wins over `block_size`.
        chunk_size: prefill in chunks of this many tokens, so every chunk after the first reads the
            earlier tokens (and its own) back from the cache, as chunked prefill does; default: one pass.
    Returns:
        [num_tokens, vocab] float32
    """
    num_tokens = len(token_ids)
    if caches is None:
        caches = create_layer_caches(model_cache_spec(model, "auto", block_size), -(-num_tokens // block_size))
    block_size = caches[0].block_size
    table = list(range(-(-num_tokens // block_size)))
    chunk_size = chunk_size or num_tokens
    logits = []
    for start in range(0, num_tokens, chunk_size):
        end = min(start + chunk_size, num_tokens)
        positions = torch.arange(start, end)
        meta = build_attention_metadata([table], [start], [end - start], block_size, positions)
        hidden = model(torch.tensor(token_ids[start:end]), positions, caches, meta)
        logits.append(model.compute_logits(hidden))
    return torch.cat(logits)


def model_cache_spec(model, cache_dtype: str, block_size: int = 16, outlier_residual: bool = False,
                     outlier_factor: float = 3.0) -> KVCacheSpec:
    """The `KVCacheSpec` of an Ember model's KV cache in `cache_dtype`."""
    return KVCacheSpec.for_model(model.config, model.model.embed_tokens.weight.dtype, cache_dtype, block_size,
                                 outlier_residual, outlier_factor)


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int = 512, stride: int = 256,
               max_tokens: int | None = None, caches: list | None = None,
               chunk_size: int | None = None, progress: bool = False) -> PerplexityResult:
    """exp(mean NLL) over `token_ids[1:]`.

    Windows of `window` tokens start every `stride` tokens; a window scores only the tokens no
    earlier window scored, so every token after the first is predicted once, from at least
    `window - stride` tokens of context (except near the start). `caches` (covering `window`
    tokens) are reused by every window, so an int8 cache's running statistics span the text;
    `chunk_size` as in `window_logits`; `progress`: a bar over the scored tokens (stderr, terminal only).
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    if len(token_ids) < 2:
        raise ValueError("need at least two tokens to score")
    nll_sum, scored, prev_end = 0.0, 0, 1  # position 0 has no prediction
    bar = progress_bar(total=len(token_ids) - 1, desc="perplexity", unit="tok", enabled=progress)
    for start in range(0, len(token_ids) - 1, stride):
        end = min(start + window, len(token_ids))
        chunk = token_ids[start:end]
        logits = window_logits(model, chunk, caches, chunk_size)
        targets = torch.tensor(chunk[1:])
        losses = F.cross_entropy(logits[:-1], targets, reduction="none")  # loss of chunk[i+1]
        first_new = max(prev_end, start + 1) - (start + 1)  # skip targets already scored
        nll_sum += losses[first_new:].double().sum().item()
        scored += len(losses) - first_new
        bar.update(len(losses) - first_new)
        prev_end = end
        if end == len(token_ids):
            break
    bar.close()
    return PerplexityResult(math.exp(nll_sum / scored), scored, nll_sum, window, stride)

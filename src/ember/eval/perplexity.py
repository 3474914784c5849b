"""Perplexity of a model on a text, with sliding windows (each token scored once, with context)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ember.attention.metadata import build_attention_metadata


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


def window_logits(model, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits at every position of one fresh sequence, through the paged model and a scratch cache."""
    cfg = model.config
    num_tokens = len(token_ids)
    num_blocks = -(-num_tokens // block_size)
    dtype = model.model.embed_tokens.weight.dtype
    shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    caches = [(torch.empty(shape, dtype=dtype), torch.empty(shape, dtype=dtype)) for _ in range(cfg.num_hidden_layers)]
    positions = torch.arange(num_tokens)
    meta = build_attention_metadata([list(range(num_blocks))], [0], [num_tokens], block_size, positions)
    hidden = model(torch.tensor(token_ids), positions, caches, meta)
    return model.compute_logits(hidden)  # [num_tokens, vocab] float32


@torch.inference_mode()
def perplexity(model, token_ids: list[int], window: int = 512, stride: int = 256,
               max_tokens: int | None = None) -> PerplexityResult:
    """exp(mean NLL) over `token_ids[1:]`.

    Windows of `window` tokens start every `stride` tokens; a window scores only the tokens no
    earlier window scored, so every token after the first is predicted once, from at least
    `window - stride` tokens of context (except near the start).
    """
    if not 0 < stride <= window:
        raise ValueError(f"need 0 < stride <= window, got stride={stride}, window={window}")
    if max_tokens is not None:
        token_ids = token_ids[:max_tokens]
    if len(token_ids) < 2:
        raise ValueError("need at least two tokens to score")
    nll_sum, scored, prev_end = 0.0, 0, 1  # position 0 has no prediction
    for start in range(0, len(token_ids) - 1, stride):
        end = min(start + window, len(token_ids))
        chunk = token_ids[start:end]
        logits = window_logits(model, chunk)
        targets = torch.tensor(chunk[1:])
        losses = F.cross_entropy(logits[:-1], targets, reduction="none")  # loss of chunk[i+1]
        first_new = max(prev_end, start + 1) - (start + 1)  # skip targets already scored
        nll_sum += losses[first_new:].double().sum().item()
        scored += len(losses) - first_new
        prev_end = end
        if end == len(token_ids):
            break
    return PerplexityResult(math.exp(nll_sum / scored), scored, nll_sum, window, stride)

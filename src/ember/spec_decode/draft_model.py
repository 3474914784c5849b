"""A draft model that proposes tokens greedily on its own paged KV cache."""

from __future__ import annotations

import torch
from torch import nn

from ember.attention.layer_cache import KVCacheSpec, create_layer_caches
from ember.attention.metadata import build_attention_metadata
from ember.kv_cache.kv_cache_manager import KVCacheManager


class _DraftSequence:
    """The draft model's view of one request: the tokens whose KV its draft cache holds, at positions
    0.. (the request's tokens, then the drafts it was fed). `KVCacheManager` reads `request_id` and
    `num_kv_tokens` from it, as from a `Request`."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.fed: list[int] = []
        self.num_verified = 0  # leading fed tokens known to be the request's own

    @property
    def num_kv_tokens(self) -> int:
        return len(self.fed)

    def sync(self, token_ids: list[int]) -> None:
        """Drop the cached rows past the longest prefix shared with the request's tokens (the drafts the
        target rejected); the request's tokens only grow, so only the fed drafts need comparing. The last
        token is always fed again when it was fed before: its logits give the first draft."""
        same = min(self.num_verified, len(token_ids) - 1)
        limit = min(len(self.fed), len(token_ids) - 1)
        while same < limit and self.fed[same] == token_ids[same]:
            same += 1
        del self.fed[same:]
        self.num_verified = same


class DraftModelProposer:
    """Runs the draft model over a batch of requests: one pass that catches each request up on the tokens
    its draft cache lacks (its prompt the first time, then the tokens accepted since) and drafts the first
    token, then one batched decode pass per further draft token.

    Draft KV stays valid where the request kept the drafted tokens: after a verification step only the
    rows past the first rejected draft are recomputed. A call frees the draft KV of every request it is
    not asked about (finished, preempted or paused ones: a paused request catches up when it resumes); a
    request the draft cache cannot hold gets no draft that step.
    """

    def __init__(self, model: nn.Module, kv_spec: KVCacheSpec, num_blocks: int) -> None:
        self.model = model
        self.block_size = kv_spec.block_size
        self.kv_caches = create_layer_caches(kv_spec, num_blocks)
        self.kv_cache_manager = KVCacheManager(num_blocks, kv_spec.block_size, enable_prefix_caching=False)
        self.sequences: dict[str, _DraftSequence] = {}

    @torch.inference_mode()
    def propose(self, requests: list, num_tokens: list[int]) -> list[list[int]]:
        """Up to `num_tokens[i]` greedy draft tokens for each of `requests` (all decoding)."""
        self._free_stale({r.request_id for r in requests})
        drafts: list[list[int]] = [[] for _ in requests]
        active = []  # (index, sequence, tokens to feed)
        for i, (request, k) in enumerate(zip(requests, num_tokens)):
            seq = self.sequences.setdefault(request.request_id, _DraftSequence(request.request_id))
            seq.sync(request.all_token_ids)
            new = request.all_token_ids[seq.num_kv_tokens:]
            if k > 0 and self.kv_cache_manager.allocate_slots(seq, len(new) + k - 1):
                seq.num_verified = request.num_tokens  # all of them are fed in the first pass
                active.append((i, seq, new))
        for step in range(max((num_tokens[i] for i, _, _ in active), default=0)):
            if step > 0:  # feed each request its previous draft token
                active = [(i, seq, [drafts[i][-1]]) for i, seq, _ in active if len(drafts[i]) < num_tokens[i]]
            if not active:
                break
            for (i, _, _), token in zip(active, self._forward([(seq, new) for _, seq, new in active])):
                drafts[i].append(token)
        return drafts

    def reset(self) -> None:
        """Forget every request's draft KV (after a failed call, whose state is unknown)."""
        for request_id in list(self.sequences):
            self.release(request_id)

    def release(self, request_id: str) -> None:
        seq = self.sequences.pop(request_id, None)
        if seq is not None:
            self.kv_cache_manager.free(seq)

    def _free_stale(self, live: set[str]) -> None:
        for request_id in [r for r in self.sequences if r not in live]:
            self.release(request_id)

    def _forward(self, batch: list[tuple[_DraftSequence, list[int]]]) -> list[int]:
        """Feed each sequence its new tokens in one model pass; the argmax after each one's last token."""
        order = sorted(range(len(batch)), key=lambda j: len(batch[j][1]) > 1)  # decode rows first
        input_ids, positions, last_rows = [], [], [0] * len(batch)
        for j in order:
            seq, new = batch[j]
            input_ids.extend(new)
            positions.extend(range(seq.num_kv_tokens, seq.num_kv_tokens + len(new)))
            last_rows[j] = len(input_ids) - 1
        positions_t = torch.tensor(positions, dtype=torch.int64)
        meta = build_attention_metadata([self.kv_cache_manager.get_block_ids(batch[j][0].request_id) for j in order],
                                        [batch[j][0].num_kv_tokens for j in order],
                                        [len(batch[j][1]) for j in order], self.block_size, positions_t)
        hidden = self.model(torch.tensor(input_ids, dtype=torch.int64), positions_t, self.kv_caches, meta, None)
        tokens = self.model.compute_logits(hidden[last_rows]).argmax(dim=-1).tolist()
        for seq, new in batch:
            seq.fed.extend(new)
        return tokens



def load_draft_model(path: str, config, target_config, target_tokenizer, target_kv_spec: KVCacheSpec,
                     num_blocks: int) -> DraftModelProposer:
    """Load the draft model at `path` (any format the engine loads) for a target with `target_config`.

    Raises:
        ValueError: the vocabularies differ (size or token strings): its tokens would mean other text.
    """
    from ember.loader.model_loader import load_model, resolve_model_path
    from ember.loader.tokenizer import Tokenizer

    path = resolve_model_path(path)
    dtype = target_kv_spec.model_dtype
    model, model_config = load_model(path, dtype, config.kernel_policy())
    if model_config.vocab_size != target_config.vocab_size:
        raise ValueError(f"the draft model's vocabulary has {model_config.vocab_size} tokens, the target's "
                         f"{target_config.vocab_size}: speculative decoding needs the same tokenizer")
    if Tokenizer.from_path(path).hf.get_vocab() != target_tokenizer.hf.get_vocab():
        raise ValueError("the draft model's tokenizer differs from the target's: speculative decoding needs "
                         "the same tokenizer")
    kv_spec = KVCacheSpec.for_model(model_config, dtype, "auto", target_kv_spec.block_size)
    return DraftModelProposer(model.eval(), kv_spec, num_blocks)

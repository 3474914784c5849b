"""The vectorized sampler: one batch of logits in, one token per row (plus logprobs) out.

Processing order follows vLLM v1: the allowed_token_ids mask, bad-word bans, logit bias and
min_tokens bans, then penalties, then argmax for greedy rows; random rows get temperature,
min-p, top-k, top-p and the exponential race. Logprobs are the "raw" ones: log-softmax of the unprocessed logits.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ember.sampling.metadata import IndexPair, SamplingMetadata

_NEG_INF = float("-inf")
# Tokens ranked first when filtering by top-p: a full sort of a large vocabulary costs more
# than the rest of sampling together, and a nucleus is usually far smaller than this.
_TOP_P_CANDIDATES = 256


@dataclass
class SamplerOutput:
    """What the sampler decided for one step.

    The logprob fields are None unless some row asked for logprobs; then k is
    `max_num_logprobs` and rows that asked for fewer are trimmed by the caller.
    """

    sampled_token_ids: torch.Tensor  # [B] int64
    logprob_token_ids: torch.Tensor | None = None  # [B, k + 1] int64: sampled token, then top-k
    logprobs: torch.Tensor | None = None  # [B, k + 1] float32, same layout
    sampled_token_ranks: torch.Tensor | None = None  # [B] int64, 1 = most likely


class Sampler:
    """Samples one token per row of a [B, V] logits batch under `SamplingMetadata`.

    Never modifies the logits it is given. Rows are independent: a seeded row draws its
    noise from its own generator, so its tokens do not depend on the rest of the batch.

    Args:
        num_top_p_candidates: how many of the most likely tokens top-p ranks before
            falling back to ranking the whole vocabulary; affects speed only.
    """

    def __init__(self, num_top_p_candidates: int = _TOP_P_CANDIDATES) -> None:
        if num_top_p_candidates < 1:
            raise ValueError(f"num_top_p_candidates must be at least 1, got {num_top_p_candidates}")
        self.num_top_p_candidates = num_top_p_candidates

    def __call__(self, logits: torch.Tensor, metadata: SamplingMetadata) -> SamplerOutput:
        """Args: logits [B, V] (float32 preferred), metadata built for the same B rows."""
        md = metadata
        if md.all_greedy and not md.needs_processing and md.max_num_logprobs is None:
            return SamplerOutput(sampled_token_ids=greedy_sample(logits))
        logits = logits.float()
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = torch.log_softmax(logits, dim=-1)  # [B, V]
        sampled = self.sample(self.apply_processors(logits, md), md)
        if raw_logprobs is None:
            return SamplerOutput(sampled_token_ids=sampled)
        return gather_logprobs(raw_logprobs, sampled, md.max_num_logprobs)

    def apply_processors(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Allowed ids, bad words, logit bias, min_tokens bans and penalties: everything greedy rows
        also see, in vLLM v1's order (`Sampler.apply_logits_processors`)."""
        if not md.needs_processing:
            return logits
        if md.allowed_token_ids_mask is not None:
            logits = logits.masked_fill(md.allowed_token_ids_mask, _NEG_INF)
        if md.bad_words_block is not None:
            logits = logits.index_put(md.bad_words_block, logits.new_tensor(_NEG_INF))
        if md.logit_bias is not None:
            rows, token_ids, values = md.logit_bias
            logits = logits.index_put((rows, token_ids), values, accumulate=True)
        if md.min_tokens_block is not None:
            logits = logits.index_put(md.min_tokens_block, logits.new_tensor(_NEG_INF))
        if md.has_penalties:
            logits = apply_penalties(logits, md)
        return logits

    def apply_warpers(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Temperature, min-p, top-k, top-p: the logits random rows sample from.

        Greedy rows are scaled by 1 (their token is the argmax, decided elsewhere).
        Filtered tokens are set to -inf.
        """
        temperature = md.temperature
        if not md.all_random:
            temperature = torch.where(temperature == 0.0, 1.0, temperature)
        logits = logits / temperature.unsqueeze(1)
        if md.min_p is not None:
            logits = apply_min_p(logits, md.min_p)
        if md.top_k is not None:
            logits = apply_top_k(logits, md.top_k)
        if md.top_p is not None:
            logits = apply_top_p(logits, md.top_p, self.num_top_p_candidates)
        return logits

    def sample(self, logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """Processed logits [B, V] -> token ids [B]: argmax on greedy rows, a draw elsewhere."""
        if md.all_greedy:
            return greedy_sample(logits)
        greedy = None if md.all_random else greedy_sample(logits)
        probs = self.apply_warpers(logits, md).softmax(dim=-1)  # [B, V]
        sampled = exponential_race(probs, md.generators)
        if greedy is None:
            return sampled
        return torch.where(md.temperature == 0.0, greedy, sampled)


def apply_penalties(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """Repetition, then frequency and presence penalties (vLLM / OpenAI definitions).

    repetition (CTRL, Keskar et al. 2019): a seen token's logit l becomes l / r if l > 0
    else l * r. frequency: l -= f * count_in_output. presence: l -= p * [count_in_output > 0].
    """
    num_reqs, vocab_size = logits.shape
    counts = _count(md.output_token_ids, num_reqs, vocab_size, logits.device)  # [B, V] float32
    if md.repetition_penalties is not None:
        seen = counts > 0
        if md.prompt_token_ids is not None:
            seen = seen.index_put(md.prompt_token_ids, torch.tensor(True, device=logits.device))
        rep = md.repetition_penalties.unsqueeze(1)  # [B, 1]
        penalized = torch.where(logits > 0, logits / rep, logits * rep)
        logits = torch.where(seen, penalized, logits)
    if md.frequency_penalties is not None:
        logits = logits - md.frequency_penalties.unsqueeze(1) * counts
    if md.presence_penalties is not None:
        logits = logits - md.presence_penalties.unsqueeze(1) * (counts > 0).float()
    return logits


def _count(pairs: IndexPair | None, num_reqs: int, vocab_size: int,
           device: torch.device) -> torch.Tensor:
    """(row, token) occurrences -> per-row token counts [B, V] float32 (exact below 2**24)."""
    counts = torch.zeros(num_reqs, vocab_size, dtype=torch.float32, device=device)
    if pairs is not None and pairs[0].numel():
        counts.index_put_(pairs, torch.ones(pairs[0].numel(), device=device), accumulate=True)
    return counts


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's top probability."""
    probs = logits.softmax(dim=-1)  # [B, V]
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)  # [B, 1]
    return logits.masked_fill(probs < threshold, _NEG_INF)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's k largest logits (ties with the k-th kept) without a full sort.

    Rows with k >= V are left alone; one `topk` of the largest enabled k serves the batch.
    """
    vocab_size = logits.shape[-1]
    disabled = top_k >= vocab_size  # [B]
    k = torch.where(disabled, 1, top_k)
    max_k = int(k.max())
    kth = logits.topk(max_k, dim=-1).values.gather(1, (k - 1).unsqueeze(1))  # [B, 1]
    kth = kth.masked_fill(disabled.unsqueeze(1), _NEG_INF)
    return logits.masked_fill(logits < kth, _NEG_INF)


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor,
                num_candidates: int = _TOP_P_CANDIDATES) -> torch.Tensor:
    """Nucleus filtering (Holtzman et al. 2020): keep the most likely tokens until mass p.

    A token survives when the mass of the strictly more likely tokens is below p, so the
    most likely token always survives; rows with p = 1 are left alone. Only the
    `num_candidates` most likely tokens are ranked when they hold mass p in every row
    (typical for peaked LM distributions); otherwise the whole vocabulary is.
    """
    num_reqs, vocab_size = logits.shape
    probs = logits.softmax(dim=-1)  # [B, V]
    active = top_p < 1.0  # [B]
    num_cand = min(num_candidates, vocab_size)
    while True:
        cand_probs, cand_ids = probs.topk(num_cand, dim=-1)  # [B, C] descending
        cum = cand_probs.cumsum(dim=-1)  # [B, C]
        if num_cand == vocab_size or bool((cum[:, -1] >= top_p)[active].all()):
            break
        num_cand = vocab_size  # some row's nucleus reaches past the candidates
    keep_cand = (cum - cand_probs) < top_p.unsqueeze(1)  # [B, C]
    keep = torch.zeros(num_reqs, vocab_size, dtype=torch.bool, device=logits.device)
    keep.scatter_(1, cand_ids, keep_cand)
    keep |= ~active.unsqueeze(1)
    return logits.masked_fill(~keep, _NEG_INF)


def exponential_race(probs: torch.Tensor, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """Sample one index per row of `probs` [B, V] as argmax(probs / E), E ~ Exponential(1).

    argmin of E_i / p_i is distributed as Categorical(p) (the "exponential race"), and needs
    no cumulative sum. Seeded rows draw their noise from their own generator.
    """
    noise = torch.empty_like(probs)  # [B, V]
    if len(generators) != probs.shape[0]:
        noise.exponential_()
    for row, generator in generators.items():
        if generator.device == noise.device:
            noise[row].exponential_(generator=generator)
        else:
            draw = torch.empty(probs.shape[-1], device=generator.device)
            noise[row].copy_(draw.exponential_(generator=generator))
    # A zero draw would turn a filtered token's 0 / 0 into NaN, which argmax would pick.
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)
    return probs.div(noise).argmax(dim=-1)


def gather_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> SamplerOutput:
    """Sampled-token logprob, its rank and the top-k logprobs of each row.

    Rank counts the tokens at least as likely as the sampled one, so 1 = most likely.
    """
    token_ids = token_ids.unsqueeze(1)  # [B, 1]
    token_logprobs = logprobs.gather(1, token_ids)  # [B, 1]
    ranks = (logprobs >= token_logprobs).sum(dim=-1)  # [B]
    ids, values = token_ids, token_logprobs
    if k > 0:
        top_values, top_ids = logprobs.topk(k, dim=-1)  # [B, k] each, descending
        ids = torch.cat([token_ids, top_ids], dim=1)
        values = torch.cat([token_logprobs, top_values], dim=1)
    return SamplerOutput(sampled_token_ids=token_ids.squeeze(1), logprob_token_ids=ids,
                         logprobs=values, sampled_token_ranks=ranks)


def greedy_sample(logits: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest logit (the first on ties, like argmax).

    `max(dim).indices` is the same answer as `argmax` but ~2.5x faster on CPU for [64, 49152].
    """
    return logits.max(dim=-1).indices

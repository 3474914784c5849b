"""Verification of draft tokens against the target's distribution (Leviathan et al. 2023, Chen et al. 2023).

A request with drafts d_1..d_k gets k + 1 rows of target logits: row j scores the position of d_{j+1},
row k the position after the last draft (the bonus). Every row is processed exactly as the `Sampler`
processes a normal step (penalties, bans, bias, temperature, min-p, top-k, top-p), with the row's own
output history (the drafts before it included). Then, in order:

- a greedy row accepts d_{j+1} when it is the argmax;
- a random row accepts d_{j+1} with probability p_j(d_{j+1}): every proposer here drafts deterministically,
  so its distribution q is one-hot and min(1, p / q) at the draft is p; on rejection the row samples from
  (p - q)+ renormalised, which is p without the draft token.

The first rejected row emits its own token and ends the request's tokens for the step; when every draft is
accepted, the bonus row's token follows. So each emitted token has exactly the target's distribution.
"""

from __future__ import annotations

import torch

from ember.sampling.metadata import SamplingMetadata
from ember.sampling.sampler import Sampler, SamplerOutput, exponential_race, gather_logprobs, greedy_sample

_NO_DRAFT = -1


def verify(sampler: Sampler, logits: torch.Tensor, md: SamplingMetadata, draft_ids: list[list[int]]
           ) -> tuple[SamplerOutput, list[int]]:
    """Verify the drafts of a batch.

    Args:
        sampler: the engine's sampler (its processors and warpers are reused).
        logits: [R, V], `len(drafts) + 1` consecutive rows per request, in request order.
        md: sampling metadata built for those R rows (each row with its own output history).
        draft_ids: each request's drafts ([] for a request that decodes one token).
    Returns:
        (the emitted tokens of every request, flattened in order, with their logprobs when asked, and the
        number each request emitted: its accepted drafts plus one).
    """
    logits = logits.float()
    processed = sampler.apply_processors(logits, md)
    drafts = torch.tensor([d for ids in draft_ids for d in (*ids, _NO_DRAFT)], dtype=torch.int64)  # [R]
    has_draft = drafts != _NO_DRAFT
    safe_drafts = drafts.clamp_min(0).unsqueeze(1)  # [R, 1]
    if md.all_greedy:
        target = greedy_sample(processed)
        accepted = has_draft & (target == drafts)
    else:
        probs = sampler.apply_warpers(processed, md).softmax(dim=-1)  # [R, V]
        draft_probs = probs.gather(1, safe_drafts).squeeze(1)  # [R]
        accepted = has_draft & (_uniform(probs.shape[0], md.generators) < draft_probs)
        # A rejected row resamples from p with its draft removed; the bonus row samples from p.
        residual = probs.scatter(1, safe_drafts, torch.where(has_draft, 0.0, draft_probs).unsqueeze(1))
        target = exponential_race(residual, md.generators)
        if not md.all_random:
            greedy_rows = md.temperature == 0.0
            greedy = greedy_sample(processed)
            target = torch.where(greedy_rows, greedy, target)
            accepted = torch.where(greedy_rows, has_draft & (greedy == drafts), accepted)
    accepted_list, target_list = accepted.tolist(), target.tolist()
    rows, tokens, counts = [], [], []
    row = 0
    for ids in draft_ids:
        num_accepted = 0
        while num_accepted < len(ids) and accepted_list[row + num_accepted]:
            num_accepted += 1
        rows.extend(range(row, row + num_accepted + 1))
        tokens.extend(ids[:num_accepted])
        tokens.append(target_list[row + num_accepted])
        counts.append(num_accepted + 1)
        row += len(ids) + 1
    token_ids = torch.tensor(tokens, dtype=torch.int64)
    if md.max_num_logprobs is None:
        return SamplerOutput(sampled_token_ids=token_ids), counts
    raw_logprobs = torch.log_softmax(logits[rows], dim=-1)  # the "raw" logprobs of the emitted rows
    return gather_logprobs(raw_logprobs, token_ids, md.max_num_logprobs), counts


def _uniform(num_rows: int, generators: dict[int, torch.Generator]) -> torch.Tensor:
    """[R] uniform draws in [0, 1); seeded rows draw from their own generator."""
    draws = torch.rand(num_rows) if len(generators) != num_rows else torch.empty(num_rows)
    for row, generator in generators.items():
        draws[row] = torch.rand(1, generator=generator)[0]
    return draws


class _DraftRow:
    """Row j of a request being verified, as `SamplingMetadata.from_requests` reads a request: the same
    parameters, generator and prompt, with the first j drafts appended to its output history (so penalties,
    min_tokens and bad words see what the request would have produced by then)."""

    structured_output = None

    def __init__(self, request, drafts: list[int]) -> None:
        self.request_id = request.request_id
        self.sampling_params = request.sampling_params
        self.generator = request.generator
        self.eos_token_id = request.eos_token_id
        self.bad_words_token_ids = request.bad_words_token_ids
        self.prompt_token_ids = request.prompt_token_ids
        self.output_token_ids = request.output_token_ids + drafts


def expand_rows(requests: list, draft_ids: list[list[int]]) -> list:
    """One sampling row per verified position: each request, then a `_DraftRow` per draft it has."""
    rows = []
    for request, ids in zip(requests, draft_ids):
        rows.append(request)
        rows.extend(_DraftRow(request, ids[:j]) for j in range(1, len(ids) + 1))
    return rows

"""Per-step batch view of the sampling parameters: the tensors the `Sampler` reads.

Built once per engine step from the scheduled requests; features nobody in the batch uses
get no tensor at all, so an all-greedy batch costs one pass over the parameters.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import torch

from ember.request import Request
from ember.sampling.bad_words import banned_token_ids

# A sparse set of (row, token id) positions in the [B, V] logits, optionally with values.
IndexPair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class SamplingMetadata:
    """Sampling parameters of one batch, one row per request, as tensors.

    Invariants: every optional tensor is None when no row of the batch uses the feature;
    a present per-row tensor has length `num_reqs`. Greedy rows of a mixed batch carry
    temperature 0 and are decided by argmax before any random-sampling filter.
    """

    num_reqs: int
    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None = None  # [B] float32, 0.0 on greedy rows, None when all greedy
    top_k: torch.Tensor | None = None  # [B] int64, disabled rows hold vocab_size
    top_p: torch.Tensor | None = None  # [B] float32, disabled rows hold 1.0
    min_p: torch.Tensor | None = None  # [B] float32, disabled rows hold 0.0
    presence_penalties: torch.Tensor | None = None  # [B] float32
    frequency_penalties: torch.Tensor | None = None  # [B] float32
    repetition_penalties: torch.Tensor | None = None  # [B] float32
    # Flat (row, token id) occurrences: outputs feed all penalties, prompts only repetition.
    output_token_ids: IndexPair | None = None  # ([N_out], [N_out]) int64
    prompt_token_ids: IndexPair | None = None  # ([N_prompt], [N_prompt]) int64
    # Seeded random rows only: row -> the request's own generator.
    generators: dict[int, torch.Generator] = field(default_factory=dict)
    # (rows, token ids) of EOS / stop ids banned until the row reaches min_tokens.
    min_tokens_block: IndexPair | None = None
    # (rows, token ids, bias values) added to the logits.
    logit_bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    # [B, V] bool, True where a row with allowed_token_ids may not sample (vLLM's mask convention).
    allowed_token_ids_mask: torch.Tensor | None = None
    # (rows, token ids) that bad words ban at this step.
    bad_words_block: IndexPair | None = None
    max_num_logprobs: int | None = None

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalties is not None or self.frequency_penalties is not None
                or self.repetition_penalties is not None)

    @property
    def needs_processing(self) -> bool:
        """True when the logits change before argmax / sampling (allowed ids, bad words, bias,
        min_tokens, penalties)."""
        return (self.has_penalties or self.logit_bias is not None or self.min_tokens_block is not None
                or self.allowed_token_ids_mask is not None or self.bad_words_block is not None)

    @classmethod
    def from_requests(cls, requests: list[Request], vocab_size: int,
                      device: torch.device | str = "cpu") -> "SamplingMetadata":
        """Gather the sampling parameters of `requests` (batch order) into tensors.

        Args:
            requests: the rows of the logits the sampler will receive, in order.
            vocab_size: V, the width of those logits.
            device: where the tensors live (the logits' device).
        Raises:
            ValueError: a logit_bias or allowed_token_ids token id lies outside [0, vocab_size).
        """
        params = [req.sampling_params for req in requests]
        num_reqs = len(params)
        is_greedy = [p.is_greedy for p in params]
        all_greedy = all(is_greedy)
        md = cls(num_reqs=num_reqs, all_greedy=all_greedy, all_random=not any(is_greedy))
        if not all_greedy:
            _fill_random(md, requests, is_greedy, vocab_size, device)
        _fill_penalties(md, requests, vocab_size, device)
        _fill_min_tokens(md, requests, vocab_size, device)
        _fill_logit_bias(md, requests, vocab_size, device)
        _fill_allowed_token_ids(md, requests, vocab_size, device)
        _fill_bad_words(md, requests, device)
        asked = [p.logprobs for p in params if p.logprobs is not None]
        if asked:
            md.max_num_logprobs = min(max(asked), vocab_size)
        return md


def _fill_random(md: SamplingMetadata, requests: list[Request], is_greedy: list[bool],
                 vocab_size: int, device: torch.device | str) -> None:
    """Temperature, top-k/top-p/min-p and per-row generators for a batch with random rows."""
    params = [req.sampling_params for req in requests]
    # Greedy rows hold exactly 0.0 so the sampler can tell them apart without an epsilon.
    md.temperature = torch.tensor([0.0 if greedy else p.temperature
                                   for p, greedy in zip(params, is_greedy)],
                                  dtype=torch.float32, device=device)
    if any(p.top_k > 0 for p in params):
        md.top_k = torch.tensor([p.top_k if 0 < p.top_k < vocab_size else vocab_size for p in params],
                                dtype=torch.int64, device=device)
    if any(p.top_p < 1.0 for p in params):
        md.top_p = torch.tensor([p.top_p for p in params], dtype=torch.float32, device=device)
    if any(p.min_p > 0.0 for p in params):
        md.min_p = torch.tensor([p.min_p for p in params], dtype=torch.float32, device=device)
    md.generators = {row: req.generator for row, req in enumerate(requests)
                     if req.generator is not None and not is_greedy[row]}


def _fill_penalties(md: SamplingMetadata, requests: list[Request], vocab_size: int,
                    device: torch.device | str) -> None:
    """Penalty values and the token occurrences they count (vLLM semantics).

    Presence and frequency penalties count output tokens only; the repetition penalty
    applies to every token seen in the prompt or the output.
    """
    params = [req.sampling_params for req in requests]
    presence = [p.presence_penalty for p in params]
    frequency = [p.frequency_penalty for p in params]
    repetition = [p.repetition_penalty for p in params]
    has_presence = any(v != 0.0 for v in presence)
    has_frequency = any(v != 0.0 for v in frequency)
    has_repetition = any(v != 1.0 for v in repetition)
    if not (has_presence or has_frequency or has_repetition):
        return
    if has_presence:
        md.presence_penalties = torch.tensor(presence, dtype=torch.float32, device=device)
    if has_frequency:
        md.frequency_penalties = torch.tensor(frequency, dtype=torch.float32, device=device)
    if has_repetition:
        md.repetition_penalties = torch.tensor(repetition, dtype=torch.float32, device=device)
        rep_rows = [row for row, v in enumerate(repetition) if v != 1.0]
        md.prompt_token_ids = _flatten(rep_rows, [requests[r].prompt_token_ids for r in rep_rows],
                                       device)
    out_rows = [row for row in range(len(params))
                if presence[row] != 0.0 or frequency[row] != 0.0 or repetition[row] != 1.0]
    md.output_token_ids = _flatten(out_rows, [requests[r].output_token_ids for r in out_rows], device)


def _fill_min_tokens(md: SamplingMetadata, requests: list[Request], vocab_size: int,
                     device: torch.device | str) -> None:
    """Ban EOS and stop_token_ids in rows that have not yet produced min_tokens tokens.

    As in vLLM, EOS is banned even when the request ignores EOS.
    """
    rows: list[int] = []
    banned: list[list[int]] = []
    for row, req in enumerate(requests):
        p = req.sampling_params
        if p.min_tokens and len(req.output_token_ids) < p.min_tokens:
            ids = set(p.stop_token_ids)
            if req.eos_token_id is not None:
                ids.add(req.eos_token_id)
            ids = [t for t in ids if t < vocab_size]
            if ids:
                rows.append(row)
                banned.append(ids)
    if rows:
        md.min_tokens_block = _flatten(rows, banned, device)


def _fill_logit_bias(md: SamplingMetadata, requests: list[Request], vocab_size: int,
                     device: torch.device | str) -> None:
    rows, token_ids, values = [], [], []
    for row, req in enumerate(requests):
        bias = req.sampling_params.logit_bias
        if not bias:
            continue
        for token_id, value in bias.items():
            if not 0 <= token_id < vocab_size:
                raise ValueError(f"logit_bias token id {token_id} is outside the vocabulary "
                                 f"[0, {vocab_size}) of request {req.request_id!r}")
            rows.append(row)
            token_ids.append(token_id)
            values.append(value)
    if rows:
        md.logit_bias = (torch.tensor(rows, dtype=torch.int64, device=device),
                         torch.tensor(token_ids, dtype=torch.int64, device=device),
                         torch.tensor(values, dtype=torch.float32, device=device))


def _fill_allowed_token_ids(md: SamplingMetadata, requests: list[Request], vocab_size: int,
                            device: torch.device | str) -> None:
    """Mask every token but the allowed ones in rows that set allowed_token_ids."""
    rows = [row for row, req in enumerate(requests) if req.sampling_params.allowed_token_ids]
    if not rows:
        return
    mask = torch.zeros(len(requests), vocab_size, dtype=torch.bool)  # [B, V]
    for row in rows:
        ids = torch.tensor(requests[row].sampling_params.allowed_token_ids, dtype=torch.int64)
        if bool(((ids < 0) | (ids >= vocab_size)).any()):
            raise ValueError(f"allowed_token_ids contains out-of-vocab token id (vocabulary size {vocab_size}) "
                             f"in request {requests[row].request_id!r}")
        mask[row] = True
        mask[row, ids] = False
    md.allowed_token_ids_mask = mask.to(device)


def _fill_bad_words(md: SamplingMetadata, requests: list[Request], device: torch.device | str) -> None:
    """The tokens each row's bad words ban given its output so far (see ember.sampling.bad_words)."""
    rows: list[int] = []
    banned: list[list[int]] = []
    for row, req in enumerate(requests):
        if req.bad_words_token_ids:
            ids = banned_token_ids(req.bad_words_token_ids, req.output_token_ids)
            if ids:
                rows.append(row)
                banned.append(ids)
    if rows:
        md.bad_words_block = _flatten(rows, banned, device)


def _flatten(rows: list[int], token_lists: list[list[int]], device: torch.device | str) -> IndexPair:
    """Ragged per-row token lists -> (row index, token id) pairs, both [sum of lengths] int64."""
    lengths = torch.tensor([len(ids) for ids in token_lists], dtype=torch.int64)
    row_ids = torch.repeat_interleave(torch.tensor(rows, dtype=torch.int64), lengths)
    token_ids = torch.tensor(list(itertools.chain.from_iterable(token_lists)), dtype=torch.int64)
    return row_ids.to(device), token_ids.to(device)

"""Prompt logprobs (vLLM's `SamplingParams.prompt_logprobs`): the raw log-softmax of the logits at prompt
positions, gathered for the actual prompt token and the k most likely ones, step by step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ember.outputs import Logprob
from ember.request import Request

# The LM head runs on at most this many prompt rows at once: a [rows, vocab] float32 block stays small
# (512 x 49152 floats = 96 MiB) however long the step's prefill chunk is.
MAX_ROWS_PER_HEAD_CALL = 512


@dataclass
class PromptLogprobsChunk:
    """Logprobs of the prompt tokens `start .. start + n - 1` of one request, computed in one step.

    Row i scores prompt token `start + i` given the tokens before it (so `start >= 1`: the first
    prompt token has no logprob). Column 0 is the actual prompt token, columns 1.. the k most likely.
    """

    request: Request
    start: int
    token_ids: torch.Tensor  # [n, 1 + k] int64
    logprobs: torch.Tensor  # [n, 1 + k] float32
    ranks: torch.Tensor  # [n] int64: rank of the actual token, 1 = most likely

    def to_dicts(self, decode: Callable[[int], str] | None) -> list[dict[int, Logprob]]:
        """One vLLM-style dict per row: the actual token first (with its rank), then the top k
        (ranks 1..k); `decode(token_id)` fills `decoded_token` (None: left None)."""
        ids, values, ranks = self.token_ids.tolist(), self.logprobs.tolist(), self.ranks.tolist()
        names: dict[int, str | None] = {}

        def name(token_id: int) -> str | None:
            if decode is None:
                return None
            if token_id not in names:
                names[token_id] = decode(token_id)
            return names[token_id]

        out = []
        for row_ids, row_values, rank in zip(ids, values, ranks):
            entry = {row_ids[0]: Logprob(row_values[0], rank, name(row_ids[0]))}
            for top_rank, (token_id, value) in enumerate(zip(row_ids[1:], row_values[1:]), start=1):
                entry.setdefault(token_id, Logprob(value, top_rank, name(token_id)))
            out.append(entry)
        return out


def prompt_row_spans(entries: list) -> list[tuple[Request, int, int, int]]:
    """(request, first row, first prompt token scored, number of rows) for each scheduled entry that
    wants prompt logprobs and has prompt rows this step; rows are laid out entry after entry.

    The row at position p scores token p + 1, so a prompt of length L has rows 0 .. L - 2; row L - 1
    predicts the first output token and belongs to the sampler. Only sample 0 of an n > 1 request
    is scored: its siblings share the prompt.
    """
    spans, offset = [], 0
    for entry in entries:
        request = entry.request
        start = request.num_computed_tokens
        end = min(start + entry.num_new_tokens, request.num_prompt_tokens - 1)
        if request.sampling_params.prompt_logprobs is not None and request.index == 0 and end > start:
            spans.append((request, offset, start + 1, end - start))
        offset += entry.num_new_tokens
    return spans


def gather_logprobs(logits: torch.Tensor, target_ids: torch.Tensor, num_top: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """log_softmax in float32, then the target's logprob and rank and the `num_top` best.

    Args:
        logits: [n, vocab] raw logits (no temperature, penalties or bias: vLLM's raw logprobs).
        target_ids: [n] int64, the token each row is scored on.
        num_top: k >= 0 (capped at the vocabulary).
    Returns:
        token_ids [n, 1 + k], logprobs [n, 1 + k] (column 0 the target), ranks [n].
    """
    logprobs = torch.log_softmax(logits.float(), dim=-1)  # [n, vocab]
    target = logprobs.gather(1, target_ids[:, None])  # [n, 1]
    ranks = (logprobs >= target).sum(dim=-1)  # ties count in, as vLLM's batched_count_greater_than
    top_values, top_ids = logprobs.topk(min(num_top, logprobs.shape[-1]), dim=-1)  # [n, k]
    return (torch.cat([target_ids[:, None], top_ids], dim=1), torch.cat([target, top_values], dim=1), ranks)


def compute_prompt_logprobs(model: torch.nn.Module, hidden: torch.Tensor, entries: list,
                            precision=None) -> list[PromptLogprobsChunk] | None:
    """Run the LM head on the step's prompt rows that asked for logprobs; None when none did.

    Args:
        model: has `compute_logits(hidden_rows, precision_of_those_rows)`.
        hidden: [num_rows, hidden_size], the step's final hidden states, laid out as `prompt_row_spans`.
        entries: the step's `ScheduledRequest`s in row order.
        precision: the step's `PrecisionMask` (None: every row quantized).
    """
    spans = prompt_row_spans(entries)
    if not spans:
        return None
    chunks = []
    for request, first_row, first_token, num_rows in spans:
        targets = torch.tensor(request.prompt_token_ids[first_token:first_token + num_rows], dtype=torch.int64)
        parts = []
        for begin in range(0, num_rows, MAX_ROWS_PER_HEAD_CALL):
            rows = list(range(first_row + begin, first_row + min(num_rows, begin + MAX_ROWS_PER_HEAD_CALL)))
            head_precision = precision.select(rows) if precision is not None else None
            logits = model.compute_logits(hidden[rows[0]:rows[-1] + 1], head_precision)  # [rows, vocab]
            parts.append(gather_logprobs(logits, targets[begin:begin + len(rows)],
                                         request.sampling_params.prompt_logprobs))
        ids, values, ranks = (torch.cat(p) for p in zip(*parts))
        chunks.append(PromptLogprobsChunk(request, first_token, ids, values, ranks))
    return chunks

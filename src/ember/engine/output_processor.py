"""Turns sampled tokens into text, decides when a sequence stops, and builds RequestOutputs."""

from __future__ import annotations

import time

from ember.engine.detokenizer import IncrementalDetokenizer
from ember.engine.prompt_logprobs import PromptLogprobsChunk
from ember.loader.tokenizer import Tokenizer
from ember.outputs import CompletionOutput, Logprob, PromptLogprobs, RequestMetrics, RequestOutput
from ember.request import Request, RequestStatus


class SequenceState:
    """Text and logprobs of one sample (one child `Request`)."""

    def __init__(self, request: Request, tokenizer: Tokenizer) -> None:
        self.request = request
        params = request.sampling_params
        self.detokenizer = (IncrementalDetokenizer(tokenizer, request.prompt_token_ids,
                                                   params.skip_special_tokens)
                            if params.detokenize else None)
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0 if params.logprobs is not None else None
        self.stop_text_len: int | None = None  # text is cut here once a stop string matched
        self.max_stop_len = max((len(s) for s in params.stop), default=0)

    def visible_text(self) -> str:
        if self.detokenizer is None:
            return ""
        text = self.detokenizer.text
        if self.stop_text_len is not None:
            return text[:self.stop_text_len]
        if not self.request.is_finished and self.max_stop_len > 1:
            # Hold back a possible stop-string prefix so streamed text never has to be retracted.
            return text[:max(0, len(text) - self.max_stop_len + 1)]
        return text

    def output(self) -> CompletionOutput:
        request = self.request
        reason = request.status.value if request.is_finished else None
        return CompletionOutput(index=request.index, text=self.visible_text(),
                                token_ids=list(request.output_token_ids),
                                cumulative_logprob=self.cumulative_logprob, logprobs=self.logprobs,
                                finish_reason=reason, stop_reason=request.stop_reason,
                                precision_switch_token=request.precision_switch_token)


class ParentState:
    """All samples of one user request (n of them) and its timing."""

    def __init__(self, request_id: str, prompt: str | None, children: list[Request],
                 tokenizer: Tokenizer) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.children = [SequenceState(child, tokenizer) for child in children]
        self.arrival_time = children[0].arrival_time
        self.first_token_time: float | None = None
        params = children[0].sampling_params
        self.prompt_logprobs: PromptLogprobs | None = [None] if params.prompt_logprobs is not None else None
        self._decode_token = (lambda token_id: tokenizer.decode([token_id], False)) if params.detokenize else None

    @property
    def finished(self) -> bool:
        return all(c.request.is_finished for c in self.children)

    def add_prompt_logprobs(self, chunk: PromptLogprobsChunk) -> None:
        """Append one step's prompt logprobs. Chunks arrive in prompt order; the rows a preempted
        request recomputes are already here and are dropped, so no position appears twice."""
        num_known = len(self.prompt_logprobs)
        if chunk.start > num_known:
            raise RuntimeError(f"prompt logprobs of {self.request_id!r} skip positions {num_known}..{chunk.start - 1}")
        if chunk.start + len(chunk.ranks) > num_known:
            self.prompt_logprobs.extend(chunk.to_dicts(self._decode_token)[num_known - chunk.start:])

    def make_output(self) -> RequestOutput:
        first = self.children[0].request
        finished = self.finished
        metrics = RequestMetrics(self.arrival_time, self.first_token_time,
                                 time.monotonic() if finished else None, first.num_cached_tokens,
                                 sum(c.request.num_preemptions for c in self.children))
        outputs = [c.output() for c in self.children]
        switches = [o.precision_switch_token for o in outputs if o.precision_switch_token is not None]
        scored = self.prompt_logprobs is not None and len(self.prompt_logprobs) == first.num_prompt_tokens
        return RequestOutput(self.request_id, self.prompt, first.prompt_token_ids, outputs, finished, metrics,
                             first.num_cached_tokens, min(switches, default=None),
                             self.prompt_logprobs if scored else None)


def check_stop(state: SequenceState, new_token: int, prev_text_len: int, max_model_len: int) -> None:
    """Set the request's finish status after `new_token` was appended (vLLM's rules).

    `prev_text_len` is the length of the detokenized text before this token; only text from
    there on (plus a stop string's length of overlap) can hold a new stop-string match.
    """
    request = state.request
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and new_token == request.eos_token_id:
            request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, None
            return
        if new_token in params.stop_token_ids:
            request.status, request.stop_reason = RequestStatus.FINISHED_STOPPED, new_token
            return
        if params.stop and state.detokenizer is not None and _match_stop_string(state, prev_text_len):
            return
    if params.max_tokens is not None and request.num_output_tokens >= params.max_tokens:
        request.status = RequestStatus.FINISHED_LENGTH
    elif request.num_tokens >= max_model_len:
        request.status = RequestStatus.FINISHED_LENGTH


def _match_stop_string(state: SequenceState, prev_text_len: int) -> bool:
    text = state.detokenizer.text
    params = state.request.sampling_params
    search_from = max(0, prev_text_len - state.max_stop_len + 1)
    for stop in params.stop:
        at = text.find(stop, search_from)
        if at >= 0:
            state.stop_text_len = at + len(stop) if params.include_stop_str_in_output else at
            state.request.status = RequestStatus.FINISHED_STOPPED
            state.request.stop_reason = stop
            return True
    return False

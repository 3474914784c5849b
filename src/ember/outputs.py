"""Results handed back to callers, shaped like vLLM's `RequestOutput` / `CompletionOutput`."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    """Log probability of one candidate token at one position."""

    logprob: float
    rank: int | None = None  # 1 = the most likely token
    decoded_token: str | None = None


# One dict per generated position: token id -> Logprob (the sampled token plus the top alternatives).
SampleLogprobs = list[dict[int, Logprob]]
# One entry per prompt token: None for the first (nothing precedes it), else the actual token plus the top k.
PromptLogprobs = list[dict[int, Logprob] | None]


@dataclass
class CompletionOutput:
    """One of the n samples of a request. `text` and `token_ids` are cumulative."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop", "length", "abort" or None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that matched
    # output-token index from which this sample ran on the high-precision path after a mid-flight
    # switch (`LLMEngine.set_request_precision`); None if it never switched
    precision_switch_token: int | None = None

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0


@dataclass
class RequestOutput:
    """The state of a request after an engine step; `finished` once every sample has ended."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics | None = None
    num_cached_tokens: int = 0
    precision_switch_token: int | None = None  # the earliest switch among `outputs`, None if none switched
    # With `SamplingParams.prompt_logprobs`: set on every output once the whole prompt is scored.
    prompt_logprobs: PromptLogprobs | None = None
    extra: dict = field(default_factory=dict)

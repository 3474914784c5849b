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


@dataclass
class BeamSearchSequence:
    """One sequence found by `LLM.beam_search` (vLLM's `BeamSearchSequence`).

    `tokens` holds the prompt and the generated ids (an ending EOS only with
    `include_stop_str_in_output`); `logprobs` has one dict per generated token: every candidate its
    step scored (the sampled token plus the top 2 * beam_width) with its raw logprob; `cum_logprob` sums
    the chosen tokens' logprobs, EOS included; `text` decodes `tokens`, the prompt included, as vLLM's
    offline `beam_search` does; `finish_reason` is "stop" (EOS, `stop_reason` its id) or "length".
    """

    tokens: list[int]
    logprobs: SampleLogprobs
    cum_logprob: float = 0.0
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class BeamSearchKVStats:
    """KV blocks of one `LLM.beam_search` call, one entry per search step, at the step's peak.

    `num_blocks_in_use[i]`: blocks referenced by the step's beams, a block shared by several beams (or
    prompts) counted once; `num_blocks_unshared[i]`: the blocks their tables list, each table counting its
    own copy, which is what the step would hold if no block were shared.
    """

    num_blocks_in_use: list[int] = field(default_factory=list)
    num_blocks_unshared: list[int] = field(default_factory=list)

    @property
    def peak_blocks_in_use(self) -> int:
        return max(self.num_blocks_in_use, default=0)

    @property
    def peak_blocks_unshared(self) -> int:
        return max(self.num_blocks_unshared, default=0)


@dataclass
class BeamSearchOutput:
    """The best `beam_width` sequences of one prompt, best first (vLLM's `BeamSearchOutput`).

    `kv_stats` is Ember's addition: the KV figures of the whole call, the same object in every output of
    the call (all prompts' beams run in the same steps).
    """

    sequences: list[BeamSearchSequence]
    kv_stats: BeamSearchKVStats | None = None

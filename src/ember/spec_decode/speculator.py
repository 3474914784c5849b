"""The engine's side of speculative decoding: who gets drafts each step, and what was accepted."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ember.request import Request
from ember.spec_decode.config import SpeculativeConfig
from ember.spec_decode.draft_budget import LOW_ACCEPTANCE, AcceptanceEstimate, StepCosts, plan_drafts
from ember.spec_decode.ngram_proposer import NgramProposer
from ember.spec_decode.suffix_proposer import SuffixProposer

logger = logging.getLogger("ember.spec_decode")


@dataclass
class SpecDecodingStats:
    """Totals since the engine started, as vLLM counts them (`vllm:spec_decode_*`)."""

    num_drafts: int = 0  # verification rounds: one per request per step that had drafts
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_position: list[int] = field(default_factory=list)  # [k]: drafts accepted at position i

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0

    @property
    def mean_acceptance_length(self) -> float:
        """Tokens emitted per verification round: the accepted drafts plus the target's own token."""
        return 1.0 + self.num_accepted_tokens / self.num_drafts if self.num_drafts else 0.0

    def snapshot(self) -> "SpecDecodingStats":
        """A copy the engine hands out with its stats (taken after every step, so no deepcopy)."""
        return SpecDecodingStats(self.num_drafts, self.num_draft_tokens, self.num_accepted_tokens,
                                 list(self.accepted_per_position))

    def as_dict(self) -> dict:
        return {"num_drafts": self.num_drafts, "num_draft_tokens": self.num_draft_tokens,
                "num_accepted_tokens": self.num_accepted_tokens,
                "acceptance_rate": self.acceptance_rate, "mean_acceptance_length": self.mean_acceptance_length,
                "acceptance_rate_per_position": [a / self.num_drafts if self.num_drafts else 0.0
                                                 for a in self.accepted_per_position]}


class SpecPause:
    """When one request drafts: a window of its latest drafts, and a pause after a window of poor acceptance.

    Once `window` tokens have been drafted, a window with fewer than `min_rate` of them accepted pauses
    speculation for `pause` output tokens (16 the first time, doubling up to 256 while windows stay poor); a
    good window resets the pause. A request whose text stops matching its proposals therefore decodes as
    without speculation, and one that starts repeating itself later is found again.
    """

    FIRST_PAUSE = 16
    MAX_PAUSE = 256

    def __init__(self, window: int, min_rate: float) -> None:
        self.window = window
        self.min_rate = min_rate
        self.drafted = 0
        self.accepted = 0
        self.pause = self.FIRST_PAUSE
        self.resume_at = 0  # output tokens the request must have before it drafts again

    def is_paused(self, num_output_tokens: int) -> bool:
        return num_output_tokens < self.resume_at

    def record(self, num_drafted: int, num_accepted: int, num_output_tokens: int) -> None:
        self.drafted += num_drafted
        self.accepted += num_accepted
        if self.drafted < self.window:
            return
        if self.accepted < self.min_rate * self.drafted:
            self.resume_at = num_output_tokens + self.pause
            self.pause = min(2 * self.pause, self.MAX_PAUSE)
        else:
            self.pause = self.FIRST_PAUSE
        self.drafted = self.accepted = 0


class Speculator:
    """Proposes drafts for the decoding requests after every step and records how many were accepted.

    A request gets no drafts when it has a grammar (the target's bitmask covers one position), while its
    speculation is paused (`SpecPause`: fewer than `min_acceptance_rate` of its last `min_drafted_tokens`
    drafts accepted), when the running batch is above `disable_by_batch_size`, or when one more token would
    end it; otherwise at most as many as fit in its `max_tokens` and the model length. With `draft_budget`
    "goodput" the step's drafts are then cut to those that pay (`draft_budget.plan_drafts`, from each
    request's acceptance and the decode step times `observe_step` measures).
    """

    def __init__(self, config: SpeculativeConfig, proposer, max_model_len: int) -> None:
        """`proposer`: a `DraftModelProposer`, or None for the n-gram lookup and suffix decoding."""
        self.config = config
        self.max_model_len = max_model_len
        self.draft_model = proposer
        self.ngram = self.suffix = None
        if config.method == "ngram":
            self.ngram = NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max)
        elif config.method == "suffix":
            self.suffix = SuffixProposer(config.suffix_decoding_max_tree_depth, config.suffix_decoding_max_cached_requests,
                                         config.suffix_decoding_max_spec_factor, config.suffix_decoding_min_token_prob)
        self._stateful = [p for p in (self.draft_model, self.suffix) if p is not None]  # per-request state to free
        self.stats = SpecDecodingStats(accepted_per_position=[0] * config.num_speculative_tokens)
        self.step_costs = StepCosts()

    def propose(self, running: list[Request]) -> None:
        """Set `spec_token_ids` of the running requests that will decode next step."""
        limit = self.config.disable_by_batch_size
        drafting = [] if limit is not None and len(running) > limit else running
        candidates, budgets = [], []
        for request in drafting:
            k = self._num_drafts(request)
            if k > 0:
                candidates.append(request)
                budgets.append(k)
        goodput = self.config.draft_budget == "goodput" and bool(candidates)
        decoding = [r for r in running if r.num_tokens - r.num_computed_tokens == 1] if goodput else []
        try:
            if goodput and self.draft_model is not None:  # drafts cost draft-model passes: plan before proposing
                budgets = self._plan(decoding, candidates, budgets)
            if self.ngram is not None:
                proposals = [self.ngram.propose(request.all_token_ids, k) for request, k in zip(candidates, budgets)]
            elif self.suffix is not None:
                proposals = self.suffix.propose(running, candidates, budgets)
            else:
                proposals = self.draft_model.propose(candidates, budgets)
            if goodput and self.draft_model is None:  # cheap proposals: plan on what was actually proposed
                proposed = [(request, drafts) for request, drafts in zip(candidates, proposals) if drafts]
                kept = self._plan(decoding, [r for r, _ in proposed], [len(d) for _, d in proposed])
                candidates, proposals = [r for r, _ in proposed], [d[:k] for (_, d), k in zip(proposed, kept)]
        except Exception:  # drafts are optional: a failing proposer or plan costs this step's drafts, not requests
            logger.exception("the %s proposer or the draft plan failed; this step runs without drafts",
                             self.config.method)
            for proposer in self._stateful:
                proposer.reset()
            return
        for request, drafts in zip(candidates, proposals):
            request.spec_token_ids = drafts

    def _plan(self, decoding: list[Request], requests: list[Request], max_drafts: list[int]) -> list[int]:
        """`plan_drafts` for `requests` among the `decoding` ones. Protected: a request with a grammar, one
        whose speculation is paused, and one whose drafts were accepted with a chance under LOW_ACCEPTANCE."""
        if not requests:
            return []
        rates = [r.spec_acceptance.rate if r.spec_acceptance is not None else AcceptanceEstimate().rate
                 for r in requests]
        candidates = {id(r) for r in requests}
        idle = sum(1 for r in decoding if id(r) not in candidates and _is_protected(r))
        return plan_drafts(len(decoding), rates, max_drafts, self.step_costs, self.config.max_request_slowdown,
                           [_is_protected(r) for r in requests], idle)

    def observe_step(self, scheduled: list, seconds: float) -> None:
        """Time one model step (`SchedulerOutput.scheduled`): a decode-only step (each request one token
        and its drafts) goes into the step costs the draft plan reads (only the "goodput" budget reads them)."""
        if self.config.draft_budget != "goodput" or not scheduled:
            return
        if all(entry.num_new_tokens == 1 + len(entry.spec_token_ids) for entry in scheduled):
            self.step_costs.observe(sum(entry.num_new_tokens for entry in scheduled), seconds)

    def _num_drafts(self, request: Request) -> int:
        if (request.structured_output is not None or request.is_finished
                or request.num_tokens - request.num_computed_tokens != 1):
            return 0
        if request.spec_pause is not None and request.spec_pause.is_paused(request.num_output_tokens):
            return 0
        params = request.sampling_params
        room = min(params.max_tokens - request.num_output_tokens, self.max_model_len - request.num_tokens) - 1
        return max(0, min(self.config.num_speculative_tokens, room))

    def record(self, request: Request, num_drafted: int, num_accepted: int) -> None:
        """Count one verification round (before its tokens are appended); poor acceptance pauses the request."""
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafted
        stats.num_accepted_tokens += num_accepted
        for position in range(num_accepted):
            stats.accepted_per_position[position] += 1
        if request.spec_pause is None:
            request.spec_pause = SpecPause(self.config.min_drafted_tokens, self.config.min_acceptance_rate)
            request.spec_acceptance = AcceptanceEstimate()
        request.spec_acceptance.record(num_drafted, num_accepted)
        request.spec_pause.record(num_drafted, num_accepted, request.num_output_tokens + num_accepted + 1)

    def release(self, request_id: str) -> None:
        """Free a finished or preempted request's draft-model or suffix-tree state (the next `propose`
        also does)."""
        for proposer in self._stateful:
            proposer.release(request_id)


def _is_protected(request: Request) -> bool:
    """Whether drafts are not expected to pay for `request` (see `Speculator._plan`)."""
    return (request.structured_output is not None
            or (request.spec_pause is not None and request.spec_pause.is_paused(request.num_output_tokens))
            or (request.spec_acceptance is not None and request.spec_acceptance.rate < LOW_ACCEPTANCE))


def build_speculator(config, model_config, tokenizer, kv_spec, num_blocks: int) -> Speculator | None:
    """The engine's `Speculator` for `config.speculative_config` (None when off); a draft model is loaded
    here, with a draft KV cache of the target's `num_blocks` blocks.

    Raises:
        ValueError: the draft model's vocabulary or tokenizer differs from the target's.
    """
    spec = config.speculative_config
    if spec is None:
        return None
    proposer = None
    if spec.method == "draft_model":
        from ember.spec_decode.draft_model import load_draft_model

        proposer = load_draft_model(spec.model, config, model_config, tokenizer, kv_spec, num_blocks)
    return Speculator(spec, proposer, config.max_model_len)

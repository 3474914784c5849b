"""The engine's record of one sequence: its tokens, progress and status."""

from __future__ import annotations

import enum
import time

import torch

from ember.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self.value in ("stop", "length", "abort")


class Request:
    """One sequence the engine generates.

    There are no prefill or decode phases: the scheduler only compares `num_computed_tokens`
    (tokens whose KV is in the cache) with `num_tokens` (prompt + sampled so far).
    A vLLM-style request with n > 1 is fanned out into n `Request`s sharing a `parent_id`.
    """

    def __init__(self, request_id: str, prompt_token_ids: list[int], sampling_params: SamplingParams,
                 eos_token_id: int | None = None, cache_salt: str | None = None,
                 parent_id: str | None = None, index: int = 0,
                 arrival_time: float | None = None) -> None:
        self.request_id = request_id
        self.parent_id = parent_id if parent_id is not None else request_id
        self.index = index  # position among the parent's n samples
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.cache_salt = cache_salt
        self.arrival_time = arrival_time if arrival_time is not None else time.monotonic()
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_evicted_tokens = 0  # of the computed tokens, those whose KV eviction dropped
        self.num_cached_tokens = 0  # prompt tokens served by the prefix cache at admission
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.first_token_time: float | None = None
        # The precision mask (see `start_dense_path`): the dual-precision ops this request runs on
        # their dense path, fixed at admission; rows at positions >= `dense_from_position` use them.
        self.precision_ops: frozenset[str] = frozenset()
        self.dense_from_position: int | None = None  # None: every row quantized
        self.precision_switch_token: int | None = None  # output index of a mid-flight switch
        # Structured output: the sequence's grammar state (a StructuredOutputRequest), None if unconstrained.
        self.structured_output = None
        # `sampling_params.bad_words` as token sequences (the engine tokenizes them once per request).
        self.bad_words_token_ids: list[list[int]] = []
        # Speculative decoding: the draft tokens proposed for the next step (the scheduler takes them) and
        # the request's `SpecPause` (None until it first drafts).
        self.spec_token_ids: list[int] = []
        self.spec_pause = None
        self.spec_acceptance = None  # spec_decode.draft_budget.AcceptanceEstimate, from the first round
        # LoRA: the adapter slot this request's rows use and the key of that load (None: the base model).
        self.lora_slot: int | None = None
        self.lora_cache_key: int | None = None
        # A seeded request owns its generator so its samples do not depend on batch neighbours.
        self.generator: torch.Generator | None = None
        if sampling_params.seed is not None:
            self.generator = torch.Generator().manual_seed(sampling_params.seed + index)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_kv_tokens(self) -> int:
        """Rows of KV the request holds: its computed tokens less the evicted ones (row i of its block
        table is the i-th kept token, at its original position)."""
        return self.num_computed_tokens - self.num_evicted_tokens

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_num_tokens(self) -> int:
        """Prompt plus the most tokens this request may generate."""
        return self.num_prompt_tokens + (self.sampling_params.max_tokens or 0)

    @property
    def is_schedulable(self) -> bool:
        """False while the request's grammar is still compiling (it waits without blocking the queue)."""
        return self.structured_output is None or self.structured_output.is_ready

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def kv_salt(self):
        """What the prefix cache keys the first block by: the `cache_salt`, plus the dense op set for a
        request admitted on the dense path (its KV is not the quantized one, and only requests with the
        same ops may share it), and the adapter load of a LoRA request (its KV is the adapter's)."""
        salt = self.cache_salt
        if self.dense_from_position == 0 and self.precision_switch_token is None and self.precision_ops:
            salt = (salt, "dense", self.precision_ops)
        return salt if self.lora_cache_key is None else (salt, "lora", self.lora_cache_key)

    @property
    def num_cacheable_tokens(self) -> int | None:
        """Leading tokens whose KV the prefix cache may share (None: all). After a mid-flight switch the
        later tokens were computed on another path than the salt says, so they are never shared."""
        return self.dense_from_position if self.precision_switch_token is not None else None

    def start_dense_path(self) -> bool:
        """Switch to the dense path of `precision_ops` from the next token sampled on (False if already on it).

        The switch is a position: the row that yields output token `k = num_output_tokens` (position
        `num_tokens - 1`) and every later one run dense; earlier positions stay quantized, also when a
        preempted request recomputes them, so recompute rebuilds exactly the KV it had. A request with
        no output yet starts dense at the tokens it has not computed (all of them when waiting).
        """
        if self.dense_from_position is not None:
            return False
        self.dense_from_position = self.num_tokens - 1 if self.output_token_ids else self.num_computed_tokens
        self.precision_switch_token = self.num_output_tokens
        return True

    def append_output_token_id(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, status={self.status.name})")

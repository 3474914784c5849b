"""`speculative_config`, as vLLM spells it: which proposer, how many tokens, when to stop speculating."""

from __future__ import annotations

import json
from dataclasses import dataclass, fields

METHODS = ("ngram", "draft_model", "suffix")
DRAFT_BUDGETS = ("goodput", "max")


@dataclass(frozen=True)
class SpeculativeConfig:
    """What `LLM(speculative_config={...})` and `ember serve --speculative-config '{...}'` accept.

    `ngram` looks the last 2..4 tokens up in the request's own prompt and output (prompt lookup) and
    proposes what followed them; `draft_model` runs a smaller model with the same vocabulary (a quantized
    checkpoint of the target itself works) greedily for `num_speculative_tokens` steps on its own paged
    KV cache; `suffix` (suffix decoding, `suffix_proposer.py`) matches the request's latest tokens in
    suffix trees over its own prompt and output and over earlier requests' outputs, with drafts as long as
    the match supports. The target verifies every proposal in one pass (exactly: greedy by comparison,
    sampling by rejection sampling), so outputs follow the target's distribution whatever the proposer
    guesses.
    """

    method: str
    # Most draft tokens a step (vLLM's default for suffix: suffix_decoding_max_tree_depth; 4 otherwise).
    num_speculative_tokens: int | None = None
    prompt_lookup_min: int = 2  # ngram: shortest suffix looked up
    prompt_lookup_max: int = 4  # ngram: longest suffix looked up (tried first)
    model: str | None = None  # draft_model: GGUF, Hugging Face directory or quantized checkpoint
    # A request pauses speculation when fewer than `min_acceptance_rate` of its last `min_drafted_tokens`
    # draft tokens were accepted (for 16 output tokens, doubling up to 256 while it stays poor: `SpecPause`).
    min_acceptance_rate: float = 0.2
    min_drafted_tokens: int = 16
    # No request speculates in a step whose running batch is larger than this (vLLM's name): at large
    # batches the step is compute-bound and rejected rows cost as much as accepted ones.
    disable_by_batch_size: int | None = None
    # How many drafts a step verifies (Ember's keys; vLLM has no such choice and always verifies the
    # proposals whole). "goodput": the drafts that raise the step's expected tokens per second, and while
    # a request in the step is not expected to gain (a grammar, paused, or accepting under half its
    # drafts' tokens) only as many as slow it by at most `max_request_slowdown` against a step without
    # drafts (`draft_budget.py`; it measures decode step times as it runs). "max": every proposal whole.
    draft_budget: str = "goodput"
    max_request_slowdown: float = 0.05
    # suffix, with vLLM's names and defaults: the longest suffix matched (and the trees' depth), finished
    # requests whose outputs the global tree keeps, a draft's length at most this factor times the match's,
    # and the least probability the tree may give a draft token.
    suffix_decoding_max_tree_depth: int = 24
    suffix_decoding_max_cached_requests: int = 10000
    suffix_decoding_max_spec_factor: float = 1.0
    suffix_decoding_min_token_prob: float = 0.1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"speculative_config method must be one of {METHODS}, got {self.method!r}")
        if not isinstance(self.suffix_decoding_max_tree_depth, int) or self.suffix_decoding_max_tree_depth < 1:
            raise ValueError("suffix_decoding_max_tree_depth must be a positive integer, got "
                             f"{self.suffix_decoding_max_tree_depth!r}")
        if not isinstance(self.suffix_decoding_max_cached_requests, int) or self.suffix_decoding_max_cached_requests < 0:
            raise ValueError("suffix_decoding_max_cached_requests must be an integer >= 0 (0: no global tree), got "
                             f"{self.suffix_decoding_max_cached_requests!r}")
        if not self.suffix_decoding_max_spec_factor > 0:
            raise ValueError(f"suffix_decoding_max_spec_factor must be positive, got {self.suffix_decoding_max_spec_factor}")
        if not 0.0 <= self.suffix_decoding_min_token_prob <= 1.0:
            raise ValueError(f"suffix_decoding_min_token_prob must be in [0, 1], got {self.suffix_decoding_min_token_prob}")
        if self.num_speculative_tokens is None:
            default = self.suffix_decoding_max_tree_depth if self.method == "suffix" else 4
            object.__setattr__(self, "num_speculative_tokens", default)
        if not isinstance(self.num_speculative_tokens, int) or self.num_speculative_tokens < 1:
            raise ValueError(f"num_speculative_tokens must be a positive integer, got {self.num_speculative_tokens!r}")
        if self.method == "ngram" and not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} "
                             f"and {self.prompt_lookup_max}")
        if self.method == "draft_model" and not self.model:
            raise ValueError('speculative_config method "draft_model" needs "model": the draft model path')
        if self.method != "draft_model" and self.model is not None:
            raise ValueError(f'speculative_config "model" is only used with method "draft_model", not {self.method!r}')
        if not 0.0 <= self.min_acceptance_rate <= 1.0:
            raise ValueError(f"min_acceptance_rate must be in [0, 1], got {self.min_acceptance_rate}")
        if self.min_drafted_tokens < 1:
            raise ValueError(f"min_drafted_tokens must be positive, got {self.min_drafted_tokens}")
        if self.draft_budget not in DRAFT_BUDGETS:
            raise ValueError(f"draft_budget must be one of {DRAFT_BUDGETS}, got {self.draft_budget!r}")
        if not 0.0 <= self.max_request_slowdown < 1.0:
            raise ValueError(f"max_request_slowdown must be in [0, 1), got {self.max_request_slowdown}")
        if self.disable_by_batch_size is not None and self.disable_by_batch_size < 1:
            raise ValueError(f"disable_by_batch_size must be positive, got {self.disable_by_batch_size}")

    @classmethod
    def parse(cls, value: "str | dict | SpeculativeConfig | None") -> "SpeculativeConfig | None":
        """A JSON object (the CLI flag), a dict (the offline API) or an instance; None stays None.

        Raises:
            ValueError: not a JSON object, an unknown key, or a value the constructor refuses.
        """
        if value is None or isinstance(value, cls):
            return value
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as exc:
                raise ValueError(f"speculative_config is not valid JSON: {exc}") from None
        if not isinstance(value, dict):
            raise ValueError(f"speculative_config must be a JSON object, got {type(value).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(f"unknown speculative_config keys {unknown}; known: {sorted(known)}")
        if "method" not in value:
            raise ValueError(f'speculative_config needs "method", one of {METHODS}')
        return cls(**value)

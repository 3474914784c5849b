"""Per-request sampling parameters, field-compatible with vLLM's `SamplingParams`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

_SAMPLING_EPS = 1e-5

# The paths a request may run on: the served quantized weights, or the high-precision ("bf16") copy of
# every op that has one (the runtime precision mask; in a float32 engine the copies run in float32).
PRECISIONS = ("quantized", "bf16")
DENSE_PRECISION = "bf16"


@dataclass
class StructuredOutputsParams:
    """A constraint on what a request may generate (vLLM's `StructuredOutputsParams`); exactly one is set.

    json: a JSON schema (dict or JSON text); json_object: any JSON object; regex: a regular expression;
    choice: one of these strings; grammar: an EBNF grammar (xgrammar's dialect, GBNF-like).
    """

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        if self.json_object:
            given.append("json_object")
        _check(len(given) == 1, "structured_outputs",
               "structured outputs need exactly one of json, regex, choice, grammar, json_object; "
               f"got {given or 'none'}")
        if self.choice is not None:
            _check(bool(self.choice) and all(isinstance(c, str) for c in self.choice), "structured_outputs",
                   "choice must be a non-empty list of strings")
            self.choice = list(self.choice)

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return "json_object" if self.json_object else next(
            name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None)


@dataclass
class SamplingParams:
    """How to sample the continuation of one prompt.

    Field names and defaults follow vLLM. Validation raises `ValueError` with a message
    naming the offending field, so servers can turn it into a 400 response.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1 disables top-k
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None  # only these may be sampled; checked against the vocab by the engine
    bad_words: list[str] | None = None  # banned words, tokenized by the engine (see ember.sampling.bad_words)
    truncate_prompt_tokens: int | None = None  # keep the prompt's last k tokens; -1 = max_model_len
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    detokenize: bool = True
    precision: str | None = None  # ember's: one of PRECISIONS; None = the engine's default
    structured_outputs: StructuredOutputsParams | None = None
    extra_args: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = list(self.allowed_token_ids)
        self.bad_words = list(dict.fromkeys(self.bad_words or []))  # as vLLM: duplicates dropped, order kept
        self._validate()

    def _validate(self) -> None:
        _check(isinstance(self.n, int) and self.n >= 1, "n", f"n must be an integer >= 1, got {self.n!r}")
        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty",
                     "repetition_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value), name,
                   f"{name} must be a finite number, got {value!r}")
        _check(self.temperature >= 0.0, "temperature",
               f"temperature must be non-negative, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(isinstance(self.top_k, int) and self.top_k >= 0, "top_k",
               f"top_k must be 0 (disable), -1 (disable), or at least 1, got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(-2.0 <= self.presence_penalty <= 2.0, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.repetition_penalty > 0.0, "repetition_penalty",
               f"repetition_penalty must be greater than zero, got {self.repetition_penalty}")
        _check(self.max_tokens is None or (isinstance(self.max_tokens, int) and self.max_tokens >= 1),
               "max_tokens", f"max_tokens must be at least 1, got {self.max_tokens}")
        _check(isinstance(self.min_tokens, int) and self.min_tokens >= 0, "min_tokens",
               f"min_tokens must be greater than or equal to 0, got {self.min_tokens}")
        if self.max_tokens is not None:
            _check(self.min_tokens <= self.max_tokens, "min_tokens",
                   f"min_tokens must be less than or equal to max_tokens={self.max_tokens}, "
                   f"got {self.min_tokens}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, int) and value >= 0), name,
                   f"{name} must be non-negative, got {value}")
        _check(self.seed is None or isinstance(self.seed, int), "seed", f"seed must be an int, got {self.seed!r}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop", "stop strings must be non-empty strings")
        _check(all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids",
               "stop_token_ids must be non-negative integers")
        _check(self.precision is None or self.precision in PRECISIONS, "precision",
               f"precision must be one of {list(PRECISIONS)} or None, got {self.precision!r}")
        if self.logit_bias:
            _check(all(math.isfinite(v) for v in self.logit_bias.values()), "logit_bias",
                   "logit_bias values must be finite")
        self._validate_vocab_fields()

    def _validate_vocab_fields(self) -> None:
        """allowed_token_ids, bad_words, truncate_prompt_tokens with vLLM's rules (the vocabulary and
        max_model_len bounds need the engine, which checks them on `add_request`)."""
        allowed = self.allowed_token_ids
        if allowed is not None:
            _check(len(allowed) > 0, "allowed_token_ids", "allowed_token_ids is not None and empty")
            _check(all(_is_int(t) and t >= 0 for t in allowed), "allowed_token_ids",
                   "allowed_token_ids contains out-of-vocab token id")
        _check(all(isinstance(w, str) and w for w in self.bad_words), "bad_words",
               f"bad_words cannot contain an empty string, got {self.bad_words!r}")
        k = self.truncate_prompt_tokens
        _check(k is None or (_is_int(k) and (k >= 1 or k == -1)), "truncate_prompt_tokens",
               f"truncate_prompt_tokens must be an integer >= 1 or -1, got {k!r}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _SAMPLING_EPS

    def clone(self, **changes) -> "SamplingParams":
        values = {f: getattr(self, f) for f in self.__dataclass_fields__}
        values.update(changes)
        return SamplingParams(**values)


@dataclass(frozen=True)
class BeamSearchParams:
    """How `LLM.beam_search` searches: vLLM's `BeamSearchParams`, field for field.

    beam_width: sequences kept per prompt at every step (and returned); max_tokens: generated tokens per
    sequence at most; ignore_eos: keep extending beams past the EOS token instead of completing them;
    temperature: only picks the extra sampled candidate each beam's step adds to its top 2 * beam_width
    (scores are the model's raw logprobs, as in vLLM); length_penalty: the exponent of the length that
    divides a beam's cumulative logprob when beams are ranked; include_stop_str_in_output: a beam ended
    by EOS keeps the EOS id in its tokens.

    Raises:
        ValueError: naming the field, for a width or token count below 1 or a non-finite number.
    """

    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    temperature: float = 0.0
    length_penalty: float = 1.0
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        for name in ("beam_width", "max_tokens"):
            value = getattr(self, name)
            _check(_is_int(value) and value >= 1, name, f"{name} must be an integer >= 1, got {value!r}")
        for name in ("temperature", "length_penalty"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and math.isfinite(value), name,
                   f"{name} must be a finite number, got {value!r}")
        _check(self.temperature >= 0.0, "temperature", f"temperature must be non-negative, got {self.temperature}")

def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, param: str, message: str) -> None:
    if not ok:
        err = ValueError(message)
        err.param = param  # lets the server fill the `param` field of its error body
        raise err

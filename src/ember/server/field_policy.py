"""The one list of vLLM request fields Ember does not implement, and what happens to fields outside vLLM's set.

Every field of vLLM's `ChatCompletionRequest`, `CompletionRequest` and tokenize requests is one of:
implemented (declared in `ember.server.protocol`), refused here unless it asks for nothing beyond vLLM's
default, or accepted because vLLM ignores it on these routes too. Fields outside vLLM's set are ignored
with a log line, as vLLM does. docs/reliability.md ("Field policy") tells the same in a table.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal

from pydantic import BaseModel, Field, TypeAdapter, ValidationError

from ember.server.errors import APIError
from ember.server.protocol import MEDIA_PART_TYPES

logger = logging.getLogger("ember.server")

_MAX_LOGGED_NAMES = 10  # a log line names at most this many ignored fields


@dataclass(frozen=True)
class RefusedField:
    """A vLLM request field Ember does not implement.

    kind: the type (pydantic) of a well-formed value; a malformed value is a 400 naming the field.
    is_default: (value, request) -> whether the value asks for nothing beyond vLLM's default, which is
        accepted (the default does nothing); any other value is refused.
    status: 501 for a valid request of a feature Ember lacks; 400 where vLLM refuses it too by default.
    reason: why, appended to the error message.
    invalid: (value, request) -> a 400 message for a well-typed value vLLM would refuse too, or None.
    """

    kind: Any
    is_default: Callable[[Any, Any], bool]
    reason: str
    status: int = 501
    invalid: Callable[[Any, Any], str | None] | None = None

    def check(self, name: str, value: Any, request: Any) -> APIError | None:
        """The error for this value, or None when it is accepted."""
        try:
            value = TypeAdapter(self.kind).validate_python(value, strict=True)  # as the declared fields
        except ValidationError as exc:
            first = exc.errors()[0].get("msg", "invalid value")
            return APIError(f"{name}: {first}", 400, name)
        message = self.invalid(value, request) if self.invalid is not None else None
        if message is not None:
            return APIError(message, 400, name)
        if self.is_default(value, request):
            return None
        return APIError(f"`{name}` {self.reason}", self.status, name)


def _one_of(*defaults: Any) -> Callable[[Any, Any], bool]:
    return lambda value, _request: any(value == d and type(value) is type(d) for d in defaults)


def _falsy(value: Any, _request: Any) -> bool:
    return not value  # None, False, 0, "", [] and {} all ask for nothing


def _any(_value: Any, _request: Any) -> bool:
    return True


def _equals_n(value: Any, request: Any) -> bool:
    return value is None or value == getattr(request, "n", 1)


def _below_n(value: Any, request: Any) -> str | None:
    n = getattr(request, "n", 1)
    return f"best_of must be greater than or equal to n, got n={n} and best_of={value}" \
        if value is not None and value < n else None


_NOT_SUPPORTED = "is not supported by Ember"
_BEAM = "belongs to beam search, which Ember does not support"
_MULTIMODAL = "is for multimodal inputs, which Ember does not support"
_DICT = dict[str, Any] | None

# Fields of both chat and completions requests.
_SAMPLING_FIELDS: dict[str, RefusedField] = {
    "best_of": RefusedField(Annotated[int, Field(ge=1)] | None, _equals_n,
                            "other than n is not supported by Ember (vLLM's V1 engine refuses it too)",
                            invalid=_below_n),
    "use_beam_search": RefusedField(bool, _falsy, _BEAM),
    "length_penalty": RefusedField(float, _one_of(1.0), _BEAM),
    "early_stopping": RefusedField(bool | str, _falsy, _BEAM),
    "watermarking": RefusedField(bool | None, _falsy, _NOT_SUPPORTED),
    "spaces_between_special_tokens": RefusedField(bool, _one_of(True), "= false is not supported by Ember"),
    "truncation_side": RefusedField(Literal["left", "right"] | None, _one_of(None, "left"),
                                    "'right' is not supported by Ember (truncate_prompt_tokens keeps the end)"),
    "logprob_token_ids": RefusedField(list[int] | None, _one_of(None), _NOT_SUPPORTED),
    "priority": RefusedField(int, _one_of(0), "other than 0 needs priority scheduling, which is not enabled "
                                              "(Ember serves first come, first served)", status=400),
    "logits_processors": RefusedField(list[Any] | None, _falsy, "is not allowed: the server takes no "
                                                                "per-request logits processors", status=400),
    "session_id": RefusedField(str | None, _one_of(None), _NOT_SUPPORTED),
    "return_tokens_as_token_ids": RefusedField(bool | None, _falsy, _NOT_SUPPORTED),
    "return_token_ids": RefusedField(bool | None, _falsy, _NOT_SUPPORTED),
    "return_prompt_text": RefusedField(bool | None, _falsy, _NOT_SUPPORTED),
    "routed_experts_prompt_start": RefusedField(int, _one_of(0), "is for mixture-of-experts routing data, "
                                                                 "which Ember does not return"),
    "cache_salt": RefusedField(str | None, _one_of(None), "is not supported by Ember (its prefix cache is "
                                                          "not salted per request)"),
    "kv_transfer_params": RefusedField(_DICT, _falsy, "is for disaggregated serving, which Ember lacks"),
    "ec_transfer_params": RefusedField(_DICT, _falsy, "is for disaggregated serving, which Ember lacks"),
    "vllm_xargs": RefusedField(_DICT, _falsy, "is for vLLM's extensions, which Ember does not have"),
    "repetition_detection": RefusedField(_DICT, _falsy, _NOT_SUPPORTED),
    "thinking_token_budget": RefusedField(int | None, _one_of(None, -1), _NOT_SUPPORTED),
    "stream_interval": RefusedField(Annotated[int, Field(ge=1)] | None, _one_of(None, 1),
                                    "other than 1 is not supported by Ember (it streams every token)"),
    "guided_decoding_backend": RefusedField(str | None, _one_of(None, "auto", "xgrammar"),
                                            "must be 'xgrammar' or 'auto': Ember has no other backend"),
    "guided_whitespace_pattern": RefusedField(str | None, _one_of(None), _NOT_SUPPORTED),
    "structural_tag": RefusedField(str | None, _one_of(None), _NOT_SUPPORTED),
    "prompt_embeds": RefusedField(str | list[str] | None, _falsy, "is not supported by Ember"),  # base64
    "media_io_kwargs": RefusedField(_DICT, _falsy, _MULTIMODAL),
    "mm_processor_kwargs": RefusedField(_DICT, _falsy, _MULTIMODAL),
    # vLLM ignores these on the generation routes (they shape its /render answers): so does Ember.
    "return_token_offsets": RefusedField(bool | None, _any, ""),
    "return_mm_kwargs": RefusedField(bool, _any, ""),
}

_CHAT_TEMPLATE = RefusedField(str | None, _one_of(None), "is not accepted: the server's template is used "
                              "(vLLM, too, refuses it unless started with --trust-request-chat-template)", status=400)

REFUSED_FIELDS: dict[str, dict[str, RefusedField]] = {
    "chat": {
        **_SAMPLING_FIELDS,
        "echo": RefusedField(bool, _falsy, "(prefixing the reply with the last message) is not supported by Ember"),
        "include_reasoning": RefusedField(bool, _one_of(True), "= false is not supported by Ember"),
        "chat_template": _CHAT_TEMPLATE,
    },
    "completions": {
        **_SAMPLING_FIELDS,
        "suffix": RefusedField(str | None, _falsy, "(fill-in-the-middle) is not supported by Ember"),
    },
    "tokenize": {
        "chat_template": _CHAT_TEMPLATE,
        "media_io_kwargs": _SAMPLING_FIELDS["media_io_kwargs"],
        "mm_processor_kwargs": _SAMPLING_FIELDS["mm_processor_kwargs"],
    },
    "detokenize": {},
}


def check_request_fields(request: BaseModel, route: str) -> None:
    """Refuse what Ember does not implement; log the fields it ignores.

    Call it after every other check, just before the request reaches the engine: an invalid request is then
    a 400 even when it also asks for something Ember lacks (that is a 501 only for valid requests).

    Args:
        request: the validated body; vLLM's fields it does not declare are in `model_extra`.
        route: "chat", "completions", "tokenize" or "detokenize".

    Raises:
        APIError: 400 for a malformed refused field (all are checked before any 501), else the field's
            status; 501 for a media content part.
    """
    refused = REFUSED_FIELDS[route]
    extra = request.model_extra or {}
    errors = [err for name, value in extra.items() if name in refused
              for err in [refused[name].check(name, value, request)] if err is not None]
    errors.sort(key=lambda err: err.status_code != 400)  # malformed first: invalid beats unsupported
    if errors:
        raise errors[0]
    _check_content_parts(getattr(request, "messages", None))
    ignored = [name for name in extra if name not in refused] + _nested_extras(request)
    if ignored:
        shown = ", ".join(ascii(name) for name in ignored[:_MAX_LOGGED_NAMES])
        more = f" and {len(ignored) - _MAX_LOGGED_NAMES} more" if len(ignored) > _MAX_LOGGED_NAMES else ""
        logger.warning("The following fields were present in the request but ignored: %s%s", shown, more)


def _check_content_parts(messages: list | None) -> None:
    for i, message in enumerate(messages or ()):
        for part in message.content if isinstance(message.content, list) else ():
            if part.type in MEDIA_PART_TYPES:
                raise APIError(f"messages.{i}: content parts of type {part.type!r} are not supported by Ember "
                               "(it reads text parts only)", 501, "messages")


def _nested_extras(request: BaseModel) -> list[str]:
    """Unknown fields inside messages, their text parts and stream_options, as dotted paths."""
    found = [f"stream_options.{name}" for name in (getattr(request, "stream_options", None) and
                                                   request.stream_options.model_extra or {})]
    for i, message in enumerate(getattr(request, "messages", None) or ()):
        found += [f"messages.{i}.{name}" for name in message.model_extra or {}]
        for j, part in enumerate(message.content if isinstance(message.content, list) else ()):
            if part.type == "text":
                found += [f"messages.{i}.content.{j}.{name}" for name in part.model_extra or {}]
    return found

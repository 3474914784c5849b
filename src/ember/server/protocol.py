"""Request bodies of the OpenAI-compatible API, with vLLM's extra sampling fields."""

from __future__ import annotations

from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic_core import PydanticCustomError

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_BAD_WORDS = 1024  # entries of `bad_words` in one request (each becomes up to two token sequences)
# Bounds on request lists (docs/reliability.md, "Limits"); a longer list is a 400 naming the field.
MAX_STOP_STRINGS = 64  # entries of `stop`
MAX_STOP_STRING_CHARS = 1024  # characters of one `stop` string
MAX_STOP_TOKEN_IDS = 1024  # entries of `stop_token_ids`
MAX_LOGIT_BIAS = 1024  # entries of `logit_bias`
MAX_PROMPTS = 1024  # prompts in one completions request (a list of strings or of token-id lists)
MAX_REQUEST_ID_CHARS = 256  # `request_id`, repeated in every streamed chunk
# Nesting levels of a body (a tool's parameters, a response schema, template variables): deeper ones would
# exhaust the stack of the recursive code that reads them (Jinja, json.dumps, the grammar compiler).
MAX_JSON_DEPTH = 64
# Roles a chat message may have (OpenAI's); any other is a 400.
ChatRole = Literal["system", "developer", "user", "assistant", "tool", "function"]
# Content part types of OpenAI and vLLM that carry no plain text: valid, but refused with 501 (Ember reads
# text only); any other type is a 400.
MediaPartType = Literal["image_url", "input_image", "image_embeds", "input_audio", "audio_url", "audio_embeds",
                        "video_url", "file", "refusal"]
MEDIA_PART_TYPES = get_args(MediaPartType)
# Arguments of transformers' `apply_chat_template` that `chat_template_kwargs` may not override.
RESERVED_TEMPLATE_KWARGS = frozenset({
    "conversation", "messages", "tools", "documents", "chat_template", "add_generation_prompt",
    "continue_final_message", "tokenize", "padding", "truncation", "max_length", "return_tensors",
    "return_dict", "return_assistant_tokens_mask", "tokenizer_kwargs"})

TokenId = Annotated[int, Field(ge=0)]
StopString = Annotated[str, Field(min_length=1, max_length=MAX_STOP_STRING_CHARS)]


def field_error(param: str | None, message: str) -> PydanticCustomError:
    """A validation error whose 400 body names `param` even where pydantic has no location (model validators)."""
    return PydanticCustomError("value_error", "{message}", {"message": message, "param": param})


def check_body(data: Any) -> Any:
    """Refuse a body with a lone UTF-16 surrogate (JSON's "\\ud800") in any string or key, or nested deeper
    than MAX_JSON_DEPTH. A surrogate is not Unicode: the tokenizer, the chat template and the UTF-8 encoder of
    the reply would all fail on it.

    Iterative, so a deeply nested body cannot exhaust the stack here."""
    stack: list[tuple[Any, tuple]] = [(data, ())]
    while stack:
        value, path = stack.pop()
        if len(path) > MAX_JSON_DEPTH:
            raise field_error(str(path[0]), f"{path[0]} is nested deeper than {MAX_JSON_DEPTH} levels")
        if isinstance(value, str):
            if not value.isascii() and not _encodes(value):
                raise _surrogate_error(path)
        elif isinstance(value, dict):
            for key, item in value.items():
                if isinstance(key, str) and not key.isascii() and not _encodes(key):
                    raise _surrogate_error(path, in_name=True)
                stack.append((item, (*path, key)))
        elif isinstance(value, list):
            stack.extend((item, (*path, i)) for i, item in enumerate(value))
    return data


def _encodes(text: str) -> bool:
    try:
        text.encode("utf-8")
        return True
    except UnicodeEncodeError:
        return False


def _surrogate_error(path: tuple, in_name: bool = False) -> PydanticCustomError:
    where = ".".join(str(p)[:64] for p in path)[:256] or "the body"
    if not _encodes(where):
        where, path = "a field name", ()
    what = ("a field name" + (f" in {where}" if path else "")) if in_name else where
    param = str(path[0]) if path else None
    return field_error(param, f"{what} contains a lone UTF-16 surrogate (\\ud800-\\udfff), which is not valid "
                              "Unicode")


class OpenAIBaseModel(BaseModel):
    # Like vLLM: unknown fields are accepted and ignored (with a log line, see ember.server.field_policy),
    # so newer clients keep working. Unlike vLLM, and like OpenAI's API, types are strict ("5" is no number,
    # 1 no boolean; an integer is a number), so what the OpenAPI document calls invalid is refused.
    model_config = ConfigDict(extra="allow", strict=True)


class RequestBody(OpenAIBaseModel):
    """A whole request body: its text and depth are checked (`check_body`) before any field is read."""

    @model_validator(mode="before")
    @classmethod
    def _check_body(cls, data: Any) -> Any:
        return check_body(data)


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False  # every chunk carries the usage so far (with include_usage)


class SamplingRequest(RequestBody):
    """Fields shared by chat and completions; None means the `SamplingParams` default.

    Ranges that need no server setting are pydantic constraints (so the OpenAPI schema shows them); the
    rest (n, logprobs, token ids in the vocabulary, lengths) are checked in `ember.server.serving`.
    """

    model: str | None = None
    n: int = Field(1, ge=1)
    temperature: float | None = Field(None, ge=0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1)
    presence_penalty: float | None = Field(0.0, ge=-2, le=2)
    frequency_penalty: float | None = Field(0.0, ge=-2, le=2)
    logit_bias: dict[str, Annotated[float, Field(allow_inf_nan=False)]] | None = Field(None, max_length=MAX_LOGIT_BIAS)
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and unused, as in vLLM
    request_id: str | None = Field(None, min_length=1, max_length=MAX_REQUEST_ID_CHARS)  # the reply's id suffix
    # vLLM's extra sampling parameters.
    top_k: int | None = Field(None, ge=-1)
    min_p: float | None = Field(None, ge=0, le=1)
    repetition_penalty: float | None = Field(None, gt=0, allow_inf_nan=False)
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    ignore_eos: bool = False
    min_tokens: int = Field(0, ge=0)
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    # each prompt token's logprob plus its k best alternatives (0: none)
    prompt_logprobs: int | None = Field(None, ge=0)
    # Only these token ids may be sampled; at most the vocabulary size of them (checked in serving).
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = Field(None, max_length=MAX_BAD_WORDS)
    # Keep the tokenized prompt's last k tokens (-1: max_model_len), before the length checks.
    truncate_prompt_tokens: int | None = Field(None, ge=-1)
    # ember's: "quantized" or "bf16" (the high-precision copies, see docs/quantization.md); None: the default
    precision: str | None = None
    # Structured output: vLLM's `structured_outputs` (json, regex, choice, grammar, json_object) or its
    # older guided_* names; chat also reads OpenAI's `response_format`.
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    response_format: dict[str, Any] | None = None


class ContentPart(OpenAIBaseModel):
    """One part of a message's `content`: text, or a media part (valid, but refused with 501)."""

    # The OpenAPI document lists what is served: text parts (media parts are refused with 501).
    type: Annotated[Literal["text"] | MediaPartType, WithJsonSchema({
        "type": "string", "enum": ["text"],
        "description": f"Only text parts are served; {', '.join(MEDIA_PART_TYPES)} are refused with 501."})]
    text: str | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> "ContentPart":
        if self.type == "text" and self.text is None:
            raise field_error("messages", "a content part of type 'text' needs a string `text`")
        return self


class ChatMessage(OpenAIBaseModel):
    role: ChatRole
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # role "tool": the call this message answers


class ChatTemplateFields(OpenAIBaseModel):
    """vLLM's chat-template options, shared by chat completions and /tokenize."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False  # leave the last message open, for the model to continue it
    documents: list[dict[str, str]] | None = None  # the template's `documents` (retrieval-augmented templates)
    chat_template_kwargs: dict[str, Any] | None = None  # more variables for the template

    @field_validator("chat_template_kwargs")
    @classmethod
    def _no_reserved_kwargs(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        reserved = sorted(set(value or ()) & RESERVED_TEMPLATE_KWARGS)
        if reserved:
            raise ValueError(f"chat_template_kwargs may not set {reserved}; use the request fields")
        return value

    @model_validator(mode="after")
    def _one_way_to_end(self) -> "ChatTemplateFields":
        if self.continue_final_message and self.add_generation_prompt:
            raise field_error("continue_final_message", "Cannot set both `continue_final_message` and "
                                                        "`add_generation_prompt` to True.")
        return self


class ChatCompletionRequest(SamplingRequest, ChatTemplateFields):
    messages: list[ChatMessage] = Field(min_length=1)
    # deprecated by OpenAI in favour of max_completion_tokens
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0)
    add_special_tokens: bool = False  # on top of the template's own (which already has any BOS)
    # passed to the chat template as `reasoning_effort` (and `enable_thinking`, unless the kwargs set it)
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = None
    # Tool calling (see ember.server.tool_calling): OpenAI's function tools.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingRequest):
    prompt: (Annotated[str, Field(min_length=1)]
             | Annotated[list[Annotated[str, Field(min_length=1)]], Field(min_length=1, max_length=MAX_PROMPTS)]
             | Annotated[list[TokenId], Field(min_length=1)]
             | Annotated[list[Annotated[list[TokenId], Field(min_length=1)]],
                         Field(min_length=1, max_length=MAX_PROMPTS)])
    max_tokens: int | None = Field(16, ge=0)  # 0 only with echo: the prompt alone
    logprobs: int | None = Field(None, ge=0)
    echo: bool | None = False
    add_special_tokens: bool = True
    # `suffix` and `best_of` are vLLM fields Ember does not implement: see ember.server.field_policy.


class TokenizeRequest(RequestBody, ChatTemplateFields):
    model: str | None = None
    prompt: str | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)] | None = None
    add_special_tokens: bool | None = None
    tools: list[dict[str, Any]] | None = None  # rendered by the chat template with `messages`
    return_token_strs: bool | None = False  # also return each token as the tokenizer's string


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[TokenId]


class LoadLoRAAdapterRequest(BaseModel):
    """`POST /v1/load_lora_adapter` (vLLM's body): a PEFT adapter directory served as model `lora_name`."""

    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(BaseModel):
    """`POST /v1/unload_lora_adapter`; `lora_int_id` is accepted for vLLM clients and not needed."""

    lora_name: str
    lora_int_id: int | None = None


class PrecisionUpdate(BaseModel):
    """`POST /admin/precision`: None keeps a value. Unknown fields are refused (a typo must not pass
    silently on an admin route)."""

    model_config = ConfigDict(extra="forbid")
    ops: list[str] | None = None  # op names, globs or dotted suffixes whose high-precision path is enabled
    default_precision: str | None = None  # "quantized" or "bf16": what requests without `precision` get

    @model_validator(mode="before")
    @classmethod
    def _check_body(cls, data: Any) -> Any:
        return check_body(data)


class PrecisionStateResponse(BaseModel):
    """`GET` and `POST /admin/precision`: the precision state after the call."""

    default_precision: str
    enabled_ops: list[str]
    available_ops: list[str]

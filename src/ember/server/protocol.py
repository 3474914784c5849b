"""Request bodies of the OpenAI-compatible API, with vLLM's extra sampling fields."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


class OpenAIBaseModel(BaseModel):
    # Like vLLM: unknown fields are accepted and ignored, so newer clients keep working.
    model_config = ConfigDict(extra="allow")


class StreamOptions(OpenAIBaseModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class SamplingRequest(OpenAIBaseModel):
    """Fields shared by chat and completions; None means the `SamplingParams` default."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(None, ge=INT64_MIN, le=INT64_MAX)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extra sampling parameters.
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: int | None = None  # each prompt token's logprob plus its k best alternatives (0: none)
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


class ChatMessage(OpenAIBaseModel):
    role: str
    content: str | list[dict[str, Any]] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # role "tool": the call this message answers


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage]
    max_tokens: int | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    add_generation_prompt: bool = True
    # Tool calling (see ember.server.tool_calling): OpenAI's function tools.
    tools: list[dict[str, Any]] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool | None = False
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True


class TokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    tools: list[dict[str, Any]] | None = None  # rendered by the chat template with `messages`


class DetokenizeRequest(OpenAIBaseModel):
    model: str | None = None
    tokens: list[int]


class PrecisionUpdate(BaseModel):
    """`POST /admin/precision`: None keeps a value. Unknown fields are refused (a typo must not pass
    silently on an admin route)."""

    model_config = ConfigDict(extra="forbid")
    ops: list[str] | None = None  # op names, globs or dotted suffixes whose high-precision path is enabled
    default_precision: str | None = None  # "quantized" or "bf16": what requests without `precision` get


class PrecisionStateResponse(BaseModel):
    """`GET` and `POST /admin/precision`: the precision state after the call."""

    default_precision: str
    enabled_ops: list[str]
    available_ops: list[str]

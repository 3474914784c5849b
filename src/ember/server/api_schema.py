"""The server's OpenAPI document, made to say what the server does: each route's reply model and content
type (/health: an empty 200, /metrics: Prometheus text, streams: server-sent events, the web pages: HTML), the error statuses it
can answer with vLLM's error body, and the bearer key when --api-key is set. Checked by schemathesis in
tests/server/test_openapi_schemathesis.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from ember.server.protocol import PrecisionStateResponse

_ERROR_DESCRIPTIONS = {
    400: "Invalid request (vLLM's BadRequestError): a malformed field, a value out of range, a prompt too long",
    401: "Missing or wrong API key (only when the server runs with --api-key)",
    404: "Unknown model (or LoRA adapter)",
    413: "Request body larger than --max-request-body-bytes",
    429: "Queue full: too many requests or prompt tokens waiting (Retry-After says when to retry)",
    500: "Internal error (never expected; the body carries no internals)",
    501: "A valid request for a feature Ember does not implement (the field is named)",
    503: "The engine is loading, failed, or the server is shutting down",
}


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None
    code: int


class ErrorResponse(BaseModel):
    """Every error reply: vLLM's (and OpenAI's) shape."""

    error: ErrorInfo


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class AssistantMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: UsageInfo
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionChunkChoice(BaseModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None


class CompletionChunk(BaseModel):
    """One `data:` event of a streamed completion (the last before [DONE] may carry only the usage)."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChunkChoice]
    usage: UsageInfo | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: dict[str, Any]
    logprobs: dict[str, Any] | None
    finish_reason: str | None
    stop_reason: int | str | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` event of a streamed chat completion."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str
    parent: str | None
    max_model_len: int


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[ModelCard]


class VersionResponse(BaseModel):
    version: str


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(BaseModel):
    prompt: str


@dataclass(frozen=True)
class RouteDoc:
    """What one route answers. reply: the 200 body's model (None: no body, plain text with `is_text`, or an
    HTML page with `is_html`);
    errors: its error statuses besides 500 (and 401 on guarded routes); chunk: with `stream: true` the reply
    is server-sent events, each `data:` one of these (or an error body), then `data: [DONE]`."""

    reply: type[BaseModel] | None
    errors: tuple[int, ...] = ()
    chunk: type[BaseModel] | None = None
    is_guarded: bool = True
    is_text: bool = False
    is_html: bool = False


_GENERATION_ERRORS = (400, 404, 413, 429, 501, 503)
ROUTES: dict[tuple[str, str], RouteDoc] = {
    ("get", "/health"): RouteDoc(None, (503,), is_guarded=False),
    ("get", "/version"): RouteDoc(VersionResponse, is_guarded=False),
    ("get", "/metrics"): RouteDoc(None, is_guarded=False),
    ("get", "/v1/models"): RouteDoc(ModelList, (503,)),
    ("post", "/v1/chat/completions"): RouteDoc(ChatCompletionResponse, _GENERATION_ERRORS, ChatCompletionChunk),
    ("post", "/v1/completions"): RouteDoc(CompletionResponse, _GENERATION_ERRORS, CompletionChunk),
    ("post", "/tokenize"): RouteDoc(TokenizeResponse, (400, 404, 413, 501, 503)),
    ("post", "/detokenize"): RouteDoc(DetokenizeResponse, (400, 404, 413, 503)),
    ("get", "/admin/precision"): RouteDoc(PrecisionStateResponse, (503,)),
    ("post", "/admin/precision"): RouteDoc(PrecisionStateResponse, (400, 413, 503)),
    ("post", "/v1/load_lora_adapter"): RouteDoc(None, (400, 413, 503), is_text=True),
    ("post", "/v1/unload_lora_adapter"): RouteDoc(None, (400, 404, 413, 503), is_text=True),
    ("get", "/"): RouteDoc(None, is_guarded=False, is_html=True),  # the chat playground (ember.server.web)
    ("get", "/dashboard"): RouteDoc(None, is_guarded=False, is_html=True),
}
_MODELS = (ErrorResponse, VersionResponse, ModelList, ChatCompletionResponse, CompletionResponse, TokenizeResponse,
           DetokenizeResponse, PrecisionStateResponse, ChatCompletionChunk, CompletionChunk)
_REF = "#/components/schemas/{model}"


def install_openapi(app: FastAPI, has_api_key: bool) -> None:
    """Make `app.openapi()` (and /openapi.json) return the document built by `build_openapi`, once."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app, has_api_key)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def build_openapi(app: FastAPI, has_api_key: bool) -> dict[str, Any]:
    """FastAPI's document (request bodies from `ember.server.protocol`) with the replies of `ROUTES`.

    Raises:
        KeyError: a route of the app is missing from `ROUTES` (so a new route cannot go undocumented).
    """
    schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
    _, defs = models_json_schema([(m, "serialization") for m in _MODELS], ref_template=_REF)
    components = schema.setdefault("components", {})
    components["schemas"] = {**components.get("schemas", {}), **defs["$defs"]}
    for name in ("HTTPValidationError", "ValidationError"):  # FastAPI's 422 body: this server answers 400
        components["schemas"].pop(name, None)
    if has_api_key:
        components["securitySchemes"] = {"APIKey": {"type": "http", "scheme": "bearer"}}
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            doc = ROUTES[(method, path)]
            operation["responses"] = _responses(path, doc, has_api_key)
            if has_api_key and doc.is_guarded:
                operation["security"] = [{"APIKey": []}]
    return schema


def _sse_event(chunk: type[BaseModel]) -> dict[str, Any]:
    """One server-sent event (OpenAPI 3.1: the schema of each event): `data` is a JSON chunk, an error body
    (a failure after the first chunk), or the final `[DONE]`."""
    payload = {"anyOf": [{"$ref": _REF.format(model=chunk.__name__)}, {"$ref": _REF.format(model="ErrorResponse")}]}
    return {"type": "object", "required": ["data"], "properties": {"data": {"anyOf": [
        {"const": "[DONE]"},
        {"type": "string", "contentMediaType": "application/json", "contentSchema": payload}]}}}


def _responses(path: str, doc: RouteDoc, has_api_key: bool) -> dict[str, Any]:
    if path == "/metrics":
        return {"200": {"description": "Prometheus metrics",
                        "content": {"text/plain": {"schema": {"type": "string"}}}}}
    ok: dict[str, Any] = {"description": "Ready (empty body)" if doc.reply is None else "Success"}
    if doc.is_text:
        ok = {"description": "Success (a line of text)", "content": {"text/plain": {"schema": {"type": "string"}}}}
    if doc.is_html:
        ok = {"description": "A web page", "content": {"text/html": {"schema": {"type": "string"}}}}
    if doc.reply is not None:
        ok["content"] = {"application/json": {"schema": {"$ref": _REF.format(model=doc.reply.__name__)}}}
    if doc.chunk is not None:
        ok["description"] = "The reply; with `stream: true`, server-sent events of chunks ending in `data: [DONE]`"
        ok["content"]["text/event-stream"] = {"schema": _sse_event(doc.chunk)}
    codes = set(doc.errors) | {500}
    if has_api_key and doc.is_guarded:
        codes.add(401)
    error_body = {"application/json": {"schema": {"$ref": _REF.format(model="ErrorResponse")}}}
    return {"200": ok, **{str(code): {"description": _ERROR_DESCRIPTIONS[code], "content": error_body}
                          for code in sorted(codes)}}

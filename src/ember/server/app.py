"""The FastAPI application: routes of the OpenAI-compatible API plus health, version, metrics and the
admin route of the runtime precision mask."""

from __future__ import annotations

import contextlib
from importlib import metadata
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from ember.server.api_schema import install_openapi
from ember.server.async_engine import AsyncEngine
from ember.server.config import ServerConfig
from ember.server.errors import APIError, error_response, install_exception_handlers
from ember.server.field_policy import check_request_fields
from ember.server.metrics import CONTENT_TYPE, ServerMetrics
from ember.server.middleware import APIKeyMiddleware, BodyLimitMiddleware
from ember.server.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                   LoadLoRAAdapterRequest, PrecisionStateResponse, PrecisionUpdate,
                                   TokenizeRequest, UnloadLoRAAdapterRequest)
from ember.server.serving_chat import OpenAIServingChat
from ember.server.serving_completion import OpenAIServingCompletion
from ember.server.serving_models import ServingModels
from ember.server.tool_calling import prepare_tools
from ember.server.web import install_web_pages


def ember_version() -> str:
    try:
        return metadata.version("ember")
    except metadata.PackageNotFoundError:
        return "unknown"


def build_app(engine_factory: Callable[[], Any], config: ServerConfig) -> FastAPI:
    """Wire engine wrapper, serving objects, metrics and routes; the engine loads at startup.

    Args:
        engine_factory: returns an `LLMEngine` (called once, on the engine thread).
        config: network, auth and admission options.
    """
    holder: dict[str, Any] = {}
    models = ServingModels(config.lora_paths())

    def make_engine() -> Any:
        engine = engine_factory()
        models.check_startup_adapters(engine)  # a bad --lora-modules entry stops the server at startup
        return engine

    metrics = ServerMetrics(lambda: async_engine.stats,
                            lambda: (async_engine.num_queued_requests, async_engine.num_queued_tokens),
                            lambda: holder.get("model_name", "unknown"))
    async_engine = AsyncEngine(make_engine, config.max_queued_requests, config.max_queued_tokens,
                               config.retry_after_s, on_finished=metrics.observe_finished,
                               on_tokens=metrics.observe_tokens)
    chat = OpenAIServingChat(async_engine, config, models)
    completion = OpenAIServingCompletion(async_engine, config, models)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        async_engine.start()
        yield
        await async_engine.shutdown()

    app = FastAPI(title="ember", version=ember_version(), lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    install_exception_handlers(app)
    install_openapi(app, has_api_key=bool(config.api_key))
    install_web_pages(app)  # the chat playground at / and the metrics dashboard at /dashboard
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_request_body_bytes)
    if config.api_key:
        app.add_middleware(APIKeyMiddleware, api_key=config.api_key)

    def served_name() -> str:
        name = chat.model_name  # raises 503 until the engine is ready
        holder["model_name"] = name
        return name

    async def guarded(fn: Callable, *args: Any) -> Response:
        """Run a generation handler; count refusals (429/503) for /metrics."""
        try:
            served_name()
            with async_engine.preparing():
                return await fn(*args)
        except Exception as exc:
            if isinstance(exc, APIError) and exc.status_code in (429, 503):
                metrics.observe_rejected(exc.status_code)
            return error_response(exc)

    @app.get("/health")
    async def health() -> Response:
        """200 while the engine admits requests; a distributed engine also lists each worker's state and
        answers 503 once none is ready."""
        states = async_engine.worker_states()
        if async_engine.is_accepting and (states is None or "ready" in states.values()):
            served_name()
            return Response(status_code=200) if states is None else JSONResponse({"engines": states})
        state = async_engine.state if states is None else "without a ready worker"
        return error_response(APIError(f"the engine is {state}", 503,
                                       headers={"Retry-After": str(config.retry_after_s)}))

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": ember_version()})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models() -> JSONResponse:
        cards = models.cards(served_name(), async_engine.engine.model_name, chat.max_model_len)
        return JSONResponse({"object": "list", "data": cards})

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(body: LoadLoRAAdapterRequest) -> Response:
        """Register a PEFT adapter under `lora_name` (vLLM's endpoint); a bad adapter is a 400."""
        served_name()
        await models.load(async_engine, body.lora_name, body.lora_path)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(body: UnloadLoRAAdapterRequest) -> Response:
        served_name()
        await models.unload(async_engine, body.lora_name)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request) -> Response:
        return await guarded(chat.create_chat_completion, body, raw.receive)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request) -> Response:
        return await guarded(completion.create_completion, body, raw.receive)

    @app.post("/tokenize")
    async def tokenize(body: TokenizeRequest) -> JSONResponse:
        served_name()
        chat.check_model(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError("give exactly one of prompt or messages", 400, "prompt")
        if body.messages is not None:
            tools = prepare_tools(body.tools, None, None).template_tools  # a bad tool is a 400 here too
            text = await chat.render_chat(body, tools)
            add_special = bool(body.add_special_tokens)
        else:
            text = body.prompt
            add_special = body.add_special_tokens is not False
        tokens = await chat.encode(text, add_special)
        check_request_fields(body, "tokenize")
        strs = chat.tokenizer.convert_ids_to_tokens(tokens) if body.return_token_strs else None
        return JSONResponse({"count": len(tokens), "max_model_len": chat.max_model_len, "tokens": tokens,
                             "token_strs": strs})

    @app.post("/detokenize")
    async def detokenize(body: DetokenizeRequest) -> JSONResponse:
        served_name()
        chat.check_model(body.model)
        chat.check_token_ids(body.tokens, "tokens")
        check_request_fields(body, "detokenize")
        text = await chat.run_tokenizer(lambda: chat.tokenizer.decode(body.tokens, skip_special_tokens=False))
        return JSONResponse({"prompt": text})

    @app.get("/admin/precision")
    async def get_precision() -> JSONResponse:
        """The runtime precision mask: default precision, enabled ops, every op with a high-precision copy."""
        served_name()
        state = await async_engine.call(lambda engine: engine.get_precision())
        return JSONResponse(PrecisionStateResponse(**state.to_dict()).model_dump())

    @app.post("/admin/precision")
    async def set_precision(body: PrecisionUpdate) -> JSONResponse:
        """Change the mask between two engine steps; requests in flight keep the ops they were admitted
        with. A bad op or precision is a 400 and changes nothing."""
        served_name()
        state = await async_engine.call(lambda engine: engine.set_precision(body.ops, body.default_precision))
        return JSONResponse(PrecisionStateResponse(**state.to_dict()).model_dump())

    return app

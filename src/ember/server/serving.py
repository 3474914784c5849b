"""What chat and completions share: model check, tokenization, limits, sampling params, streaming plumbing."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import time
import uuid
from typing import Any, AsyncIterator

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from ember.engine.prompt_truncation import resolve_truncation, truncate_token_ids
from ember.lora.request import LoRARequest
from ember.outputs import Logprob, RequestOutput
from ember.sampling_params import SamplingParams, StructuredOutputsParams
from ember.server.async_engine import AsyncEngine, RequestStream
from ember.server.chat_templates import ChatTemplates
from ember.server.config import ServerConfig
from ember.server.errors import APIError
from ember.server.protocol import ChatMessage, ChatTemplateFields, SamplingRequest
from ember.server.serving_models import ServingModels
from ember.server.structured_outputs import structured_outputs_from_request
from ember.server.tool_calling import template_tool_calls

LOGPROB_FLOOR = -9999.0  # JSON has no -inf; vLLM clamps to the same floor


class OpenAIServing:
    """Turns validated request bodies into engine requests and back.

    Tokenization runs on one worker thread so long prompts do not stall the event loop.
    """

    def __init__(self, async_engine: AsyncEngine, config: ServerConfig, models: ServingModels) -> None:
        self.async_engine = async_engine
        self.config = config
        self.models = models
        self._tokenizer_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="ember-tokenize")
        self.chat_templates = ChatTemplates(config.chat_template)

    @property
    def engine(self) -> Any:
        if not self.async_engine.is_ready:
            raise APIError("the engine is not ready", 503,
                           headers={"Retry-After": str(self.config.retry_after_s)})
        return self.async_engine.engine

    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def model_name(self) -> str:
        return self.config.served_model_name or self.engine.model_name

    @property
    def max_model_len(self) -> int:
        return self.engine.config.max_model_len

    def check_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names (None: the base model); an unknown name is a 404."""
        return self.models.resolve(model, self.model_name)

    def reply_model(self, lora_request: LoRARequest | None) -> str:
        """The `model` a response names: the adapter's name for an adapter request, as vLLM does."""
        return lora_request.lora_name if lora_request is not None else self.model_name

    async def run_tokenizer(self, fn: Any, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._tokenizer_pool, fn, *args)

    async def encode(self, text: str, add_special_tokens: bool, max_length: int | None = None) -> list[int]:
        """Token ids of `text`; with `max_length`, its last ones (see ember.engine.prompt_truncation)."""
        kwargs = {} if max_length is None else {"max_length": max_length}
        return await self.run_tokenizer(
            lambda: self.tokenizer.encode(text, add_special_tokens=add_special_tokens, **kwargs))

    def prompt_truncation(self, req: SamplingRequest) -> int | None:
        """How many prompt tokens `truncate_prompt_tokens` keeps (None: all); a bad value is a 400."""
        return resolve_truncation(req.truncate_prompt_tokens, self.max_model_len)

    async def encode_prompt(self, prompt: str | list[int], add_special_tokens: bool, keep: int | None) -> list[int]:
        """A prompt's token ids, cut to its last `keep` tokens (vLLM: before any length check)."""
        if isinstance(prompt, str):
            return await self.encode(prompt, add_special_tokens, keep)
        return truncate_token_ids(prompt, keep)

    async def render_chat(self, req: ChatTemplateFields, tools: list[dict] | None = None) -> str:
        """Apply the chat template (`ChatTemplates.select` picks it) to `req.messages` with the tools it should
        show and the request's template options (as vLLM: `chat_template_kwargs`, `documents`,
        `reasoning_effort`, `continue_final_message`); a template that refuses the messages is a 400."""
        messages = getattr(req, "messages", None)
        if not messages:
            raise APIError("messages must contain at least one message", 400, "messages")
        dicts = [chat_message_dict(m) for m in messages]
        kwargs = {**template_variables(req),
                  **self.chat_templates.render_kwargs(getattr(self.tokenizer, "chat_template", None), dicts, tools)}
        try:
            return await self.run_tokenizer(
                lambda: self.tokenizer.apply_chat_template(dicts, add_generation_prompt=req.add_generation_prompt,
                                                           **kwargs))
        except APIError:
            raise
        except Exception as exc:  # jinja raises TemplateError (e.g. roles out of order)
            raise APIError(f"chat template failed: {exc}", 400, "messages") from None

    def check_token_ids(self, token_ids: list[int], param: str = "prompt") -> None:
        vocab_size = self.tokenizer.vocab_size
        bad = next((t for t in token_ids if not 0 <= t < vocab_size), None)
        if bad is not None:
            raise APIError(f"token id {bad} is out of vocabulary (size {vocab_size})", 400, param)

    def resolve_max_tokens(self, num_prompt_tokens: int, requested: int | None) -> int:
        """vLLM's rule: default to what fits; a request beyond max_model_len is a 400."""
        max_len = self.max_model_len
        if num_prompt_tokens == 0:
            raise APIError("the prompt must not be empty", 400, "prompt")
        if num_prompt_tokens >= max_len:
            raise APIError(f"This model's maximum context length is {max_len} tokens. However, your "
                           f"request has {num_prompt_tokens} input tokens. Please reduce the length of "
                           "the input messages.", 400, "messages")
        if requested is None:
            return max_len - num_prompt_tokens
        if requested < 1:
            raise APIError(f"max_tokens must be at least 1, got {requested}", 400, "max_tokens")
        if num_prompt_tokens + requested > max_len:
            raise APIError(f"This model's maximum context length is {max_len} tokens. However, you "
                           f"requested {num_prompt_tokens + requested} tokens ({num_prompt_tokens} in the "
                           f"messages, {requested} in the completion). Please reduce the length of the "
                           "messages or completion.", 400, "max_tokens")
        return requested

    async def structured_outputs(self, req: SamplingRequest) -> StructuredOutputsParams | None:
        """The request's output constraint, its grammar compiled (or found in the cache) off the event loop
        and off the engine's step loop; an invalid schema, regex or grammar is a 400 naming the reason."""
        params = structured_outputs_from_request(req)
        if params is not None:
            await self.check_grammar(params)
        return params

    async def check_grammar(self, params: StructuredOutputsParams) -> None:
        future = self.engine.structured_output.compile(params)
        try:
            await asyncio.wrap_future(future)
        except ValueError as exc:
            raise APIError(str(exc), 400, getattr(exc, "param", "structured_outputs")) from None

    def sampling_params(self, req: SamplingRequest, max_tokens: int, logprobs: int | None,
                        structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
        """Build and validate `SamplingParams`; its ValueError carries the offending field."""
        cfg, vocab_size = self.config, self.tokenizer.vocab_size
        if not 1 <= req.n <= cfg.max_n:
            raise APIError(f"n must be in [1, {cfg.max_n}], got {req.n}", 400, "n")
        if logprobs is not None and not 0 <= logprobs <= cfg.max_logprobs:
            raise APIError(f"logprobs must be in [0, {cfg.max_logprobs}], got {logprobs}", 400, "logprobs")
        if req.stream_options is not None and not req.stream:
            raise APIError("Stream options can only be defined when `stream=True`.", 400, "stream_options")
        check_prompt_logprobs(req, cfg.max_logprobs)
        kwargs: dict[str, Any] = {}
        for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty",
                     "frequency_penalty", "repetition_penalty"):
            value = getattr(req, name)
            if value is not None:
                kwargs[name] = value
        if kwargs.get("top_k", 0) >= vocab_size:
            kwargs["top_k"] = 0  # a top-k over the whole vocabulary is no top-k
        stop_token_ids = req.stop_token_ids or []
        self.check_token_ids(stop_token_ids, "stop_token_ids")
        self._check_allowed_token_ids(req.allowed_token_ids)
        return SamplingParams(
            n=req.n, max_tokens=max_tokens, min_tokens=req.min_tokens, seed=req.seed, stop=req.stop,
            stop_token_ids=stop_token_ids, ignore_eos=req.ignore_eos, logprobs=logprobs,
            logit_bias=self._logit_bias(req.logit_bias), skip_special_tokens=req.skip_special_tokens,
            include_stop_str_in_output=req.include_stop_str_in_output, precision=req.precision,
            structured_outputs=structured_outputs, prompt_logprobs=req.prompt_logprobs,
            allowed_token_ids=req.allowed_token_ids, bad_words=req.bad_words,
            truncate_prompt_tokens=req.truncate_prompt_tokens, **kwargs)

    def _check_allowed_token_ids(self, allowed: list[int] | None) -> None:
        """vLLM's rules (non-empty, in the vocabulary) plus a length bound: the vocabulary size."""
        if allowed is None:
            return
        vocab_size = self.tokenizer.vocab_size
        if not allowed:
            raise APIError("allowed_token_ids is not None and empty", 400, "allowed_token_ids")
        if len(allowed) > vocab_size:
            raise APIError(f"allowed_token_ids has {len(allowed)} entries, more than the vocabulary size "
                           f"{vocab_size}", 400, "allowed_token_ids")
        if any(not 0 <= t < vocab_size for t in allowed):
            raise APIError(f"allowed_token_ids contains out-of-vocab token id (vocabulary size {vocab_size})",
                           400, "allowed_token_ids")

    def _logit_bias(self, bias: dict[str, float] | None) -> dict[int, float] | None:
        if not bias:
            return None
        vocab_size, out = self.tokenizer.vocab_size, {}
        for key, value in bias.items():
            try:
                token_id = int(key)
            except ValueError:
                raise APIError(f"logit_bias key {key!r} is not a token id", 400, "logit_bias") from None
            if not 0 <= token_id < vocab_size or not math.isfinite(value):
                raise APIError(f"logit_bias entry {key!r}: {value} is out of range", 400, "logit_bias")
            out[token_id] = min(100.0, max(-100.0, value))  # OpenAI's documented range
        return out

    async def submit(self, prefix: str, prompts: list[list[int]], params: SamplingParams,
                     lora_request: LoRARequest | None = None) -> list[RequestStream]:
        """Add one engine request per prompt; on any failure the ones already added are aborted."""
        base_id = f"{prefix}-{uuid.uuid4().hex}"
        streams: list[RequestStream] = []
        try:
            for i, token_ids in enumerate(prompts):
                request_id = base_id if len(prompts) == 1 else f"{base_id}-{i}"
                streams.append(await self.async_engine.add_request(request_id, token_ids, params, lora_request))
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        return streams

    async def collect(self, receive: Receive, streams: list[RequestStream]) -> list[RequestOutput] | None:
        """Wait for every request to finish; None (after aborting them) if the client disconnects."""
        async def final_outputs() -> list[RequestOutput]:
            finals = []
            for stream in streams:
                last = None
                async for last in stream:
                    pass
                finals.append(last)
            return finals

        work = asyncio.ensure_future(final_outputs())
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
            return work.result() if work.done() else None
        finally:
            work.cancel()
            watcher.cancel()
            for stream in streams:
                stream.abort()


def template_variables(req: ChatTemplateFields) -> dict[str, Any]:
    """The request's own variables for the chat template (the server's choices are added on top)."""
    variables = dict(req.chat_template_kwargs or {})
    effort = getattr(req, "reasoning_effort", None)
    if effort is not None:  # as vLLM: thinking templates (Qwen3, ...) read enable_thinking
        variables.setdefault("enable_thinking", effort != "none")
        variables["reasoning_effort"] = effort
    if req.documents is not None:
        variables["documents"] = req.documents
    if req.continue_final_message:
        variables["continue_final_message"] = True
    return variables


def chat_message_dict(message: ChatMessage) -> dict:
    """A message as the chat template expects it; text parts are joined. Media parts are left out here:
    `field_policy.check_request_fields` refuses them (501) before anything is generated."""
    content = message.content
    if isinstance(content, list):
        content = "\n".join(part.text for part in content if part.type == "text")
    out = {"role": message.role, "content": content if content is not None else ""}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_calls:
        out["tool_calls"] = template_tool_calls(message.tool_calls)
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out


async def wait_for_disconnect(receive: Receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (prompt index, output), in arrival order.

    At most one read per stream is in flight and nothing is buffered here, so while the caller waits
    (a client that stops reading) each stream keeps only its newest output.
    """
    iterators = [aiter(stream) for stream in streams]
    reads = {asyncio.ensure_future(anext(it)): i for i, it in enumerate(iterators)}
    try:
        while reads:
            done, _ = await asyncio.wait(reads, return_when=asyncio.FIRST_COMPLETED)
            for read in sorted(done, key=reads.__getitem__):
                i = reads.pop(read)
                try:
                    output = read.result()
                except StopAsyncIteration:
                    continue
                yield i, output
                reads[asyncio.ensure_future(anext(iterators[i]))] = i
    finally:
        for read in reads:
            read.cancel()


class SSEResponse(StreamingResponse):
    """Server-sent events that stop, and abort their requests, as soon as the client disconnects.

    Starlette only notices a disconnect on its next write; this also listens for it while the
    generator waits on the engine (queued or in a long prefill).
    """

    def __init__(self, content: AsyncIterator[str]) -> None:
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        pump = asyncio.ensure_future(self.stream_response(send))
        watcher = asyncio.ensure_future(wait_for_disconnect(receive))
        try:
            await asyncio.wait({pump, watcher}, return_when=asyncio.FIRST_COMPLETED)
            if pump.done() and not pump.cancelled() and not isinstance(pump.exception(), OSError):
                pump.result()
        finally:
            pump.cancel()
            watcher.cancel()
            await asyncio.gather(pump, watcher, return_exceptions=True)
            await self.body_iterator.aclose()


def sse(data: str) -> str:
    return f"data: {data}\n\n"


def token_text(tokenizer: Any, token_id: int, logprob: Logprob | None) -> str:
    if logprob is not None and logprob.decoded_token is not None:
        return logprob.decoded_token
    return tokenizer.decode([token_id], skip_special_tokens=False)


def clamp_logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR) if not math.isnan(value) else LOGPROB_FLOOR


def check_prompt_logprobs(req: SamplingRequest, max_logprobs: int) -> None:
    """vLLM's rules for `prompt_logprobs`: within the server's logprobs limit, and not with `stream`."""
    value = req.prompt_logprobs
    if value is not None and not 0 <= value <= max_logprobs:
        raise APIError(f"prompt_logprobs must be in [0, {max_logprobs}], got {value}", 400, "prompt_logprobs")
    if value and req.stream:
        raise APIError("`prompt_logprobs` are not available when `stream=True`.", 400, "prompt_logprobs")


def prompt_logprobs_body(prompt_logprobs: list[dict[int, Logprob] | None] | None) -> list | None:
    """`RequestOutput.prompt_logprobs` as vLLM writes it in JSON: null for the first prompt token, then
    {token id: {"logprob", "rank", "decoded_token"}} per token (the actual token first, then the top k)."""
    if prompt_logprobs is None:
        return None
    return [None if step is None else
            {str(token_id): {"logprob": clamp_logprob(lp.logprob), "rank": lp.rank, "decoded_token": lp.decoded_token}
             for token_id, lp in step.items()}
            for step in prompt_logprobs]


def top_entries(step: dict[int, Logprob], k: int) -> list[tuple[int, Logprob]]:
    """The k most likely candidates of one position, best first."""
    ranked = sorted(step.items(), key=lambda kv: (kv[1].rank if kv[1].rank is not None else 1 << 30,
                                                    -kv[1].logprob))
    return ranked[:k]


def reply_id(prefix: str, req: SamplingRequest, stream: RequestStream) -> str:
    """The reply's `id`: vLLM's "<prefix>-<request_id>" when the request names one, else the engine's id
    (which stays unique either way)."""
    return f"{prefix}-{req.request_id}" if req.request_id else stream.request_id


def stream_usage(req: SamplingRequest) -> tuple[bool, bool]:
    """(include_usage, continuous_usage_stats) of a streamed request; as vLLM, per-chunk usage needs both."""
    options = req.stream_options
    include = bool(options and options.include_usage)
    return include, include and bool(options.continuous_usage_stats)


def usage(num_prompt_tokens: int, num_completion_tokens: int) -> dict:
    return {"prompt_tokens": num_prompt_tokens, "completion_tokens": num_completion_tokens,
            "total_tokens": num_prompt_tokens + num_completion_tokens}


def now_s() -> int:
    return int(time.time())

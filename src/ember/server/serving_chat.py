"""POST /v1/chat/completions: chat template -> engine request -> chat.completion(.chunk) bodies."""

from __future__ import annotations

import functools
import json
from typing import Any, AsyncIterator, Callable

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from ember.outputs import CompletionOutput, Logprob
from ember.reasoning import create_reasoning_parser
from ember.sampling_params import StructuredOutputsParams
from ember.server.async_engine import RequestStream
from ember.server.chat_output import ChatOutputParser
from ember.server.errors import APIError, sse_error
from ember.server.field_policy import check_request_fields
from ember.server.protocol import ChatCompletionRequest
from ember.server.serving import (OpenAIServing, SSEResponse, clamp_logprob, merge_streams, now_s,
                                  prompt_logprobs_body, reply_id, sse, stream_usage, token_text, top_entries,
                                  usage)
from ember.server.tool_calling import ToolRequest, prepare_tools


class OpenAIServingChat(OpenAIServing):
    """Chat completions, streamed or not."""

    async def create_chat_completion(self, req: ChatCompletionRequest, receive: Receive) -> Response:
        lora_request = self.check_model(req.model)
        tools = prepare_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        prompt = await self.render_chat(req, tools.template_tools)
        # The template already carries any BOS token, so none is added again unless asked (as vLLM does);
        # truncation keeps the rendered prompt's last tokens.
        prompt_ids = await self.encode(prompt, add_special_tokens=req.add_special_tokens,
                                       max_length=self.prompt_truncation(req))
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self.resolve_max_tokens(len(prompt_ids), requested)
        num_top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs and req.top_logprobs > 0:
            raise APIError("top_logprobs requires logprobs=true", 400, "top_logprobs")
        params = self.sampling_params(req, max_tokens, num_top, await self._constraint(req, tools))
        tool_parser = tools.create_parser(self.config.tool_call_parser, self.tokenizer)
        if tool_parser is not None and tool_parser.skip_special_tokens is False:
            params = params.clone(skip_special_tokens=False)  # the format's markers are special tokens
        new_parser = functools.partial(ChatOutputParser, self.reasoning_parser, tool_parser,
                                       tools.max_tool_calls, tools.finishes_with_tool_calls)
        check_request_fields(req, "chat")  # last: a 501 only for an otherwise valid request
        [stream] = await self.submit("chatcmpl", [prompt_ids], params, lora_request)
        meta = {"id": reply_id("chatcmpl", req, stream), "created": now_s(), "model": self.reply_model(lora_request)}
        if req.stream:
            return SSEResponse(self._stream(stream, meta, req.n, num_top, stream_usage(req), new_parser))
        finals = await self.collect(receive, [stream])
        if finals is None:
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(self._full_body(finals[0], meta, num_top, new_parser))

    @functools.cached_property
    def reasoning_parser(self) -> Any:
        """`--reasoning-parser`'s parser (stateless, shared by all requests), or None."""
        name = self.config.reasoning_parser
        return create_reasoning_parser(name, self.tokenizer) if name is not None else None

    async def _constraint(self, req: ChatCompletionRequest, tools: ToolRequest) -> StructuredOutputsParams | None:
        """The request's structured-output constraint, or the grammar that forces its tool calls."""
        requested = await self.structured_outputs(req)
        if tools.structured_outputs is None:
            return requested
        if requested is not None:
            raise APIError("tool_choice 'required' or a named function cannot be combined with "
                           "response_format or structured_outputs", 400, "tool_choice")
        await self.check_grammar(tools.structured_outputs)
        return tools.structured_outputs

    def _full_body(self, output: Any, meta: dict, num_top: int | None,
                   new_parser: Callable[[], ChatOutputParser]) -> dict:
        choices = []
        for c in sorted(output.outputs, key=lambda c: c.index):
            parser = new_parser()
            choices.append({
                "index": c.index,
                "message": parser.message(c.text),
                "logprobs": self._logprobs(c, 0, num_top),
                "finish_reason": parser.finish_reason(c.finish_reason),
                "stop_reason": c.stop_reason,
            })
        num_generated = sum(len(c.token_ids) for c in output.outputs)
        body = {**meta, "object": "chat.completion", "choices": choices,
                "usage": usage(len(output.prompt_token_ids), num_generated)}
        if output.prompt_logprobs is not None:  # vLLM's extra field, when the request set `prompt_logprobs`
            body["prompt_logprobs"] = prompt_logprobs_body(output.prompt_logprobs)
        return body

    async def _stream(self, stream: RequestStream, meta: dict, n: int, num_top: int | None,
                      usage_options: tuple[bool, bool],
                      new_parser: Callable[[], ChatOutputParser]) -> AsyncIterator[str]:
        """The chunks; `usage_options` is (include_usage, continuous_usage_stats): a last chunk with the
        usage, and in every chunk its choice's usage so far (as vLLM)."""
        head = {**meta, "object": "chat.completion.chunk"}
        include_usage, continuous_usage = usage_options

        def chunk(index: int, delta: dict, logprobs: Any = None, finish: Any = None, stop: Any = None,
                  num_tokens: int = 0) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop
            body = {**head, "choices": [choice]}
            if continuous_usage:
                body["usage"] = usage(num_prompt_tokens, num_tokens)
            return sse(json.dumps(body))

        parsers, sent_tokens, done = [new_parser() for _ in range(n)], [0] * n, [False] * n
        num_prompt_tokens = num_generated = 0
        try:
            async for _, output in merge_streams([stream]):
                is_first = num_prompt_tokens == 0
                num_prompt_tokens = len(output.prompt_token_ids)
                if is_first:  # the role goes first, once the engine has begun (as vLLM)
                    for i in range(n):
                        yield chunk(i, {"role": "assistant", "content": ""})
                for c in output.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    delta = parsers[i].delta(c.text, is_final=c.finish_reason is not None)
                    n_tokens = len(c.token_ids)
                    if delta or n_tokens > sent_tokens[i] or c.finish_reason:
                        yield chunk(i, delta, self._logprobs(c, sent_tokens[i], num_top),
                                    parsers[i].finish_reason(c.finish_reason), c.stop_reason, n_tokens)
                    sent_tokens[i] = n_tokens
                    done[i] = c.finish_reason is not None
                num_generated = sum(len(c.token_ids) for c in output.outputs)
            if include_usage:
                yield sse(json.dumps({**head, "choices": [], "usage": usage(num_prompt_tokens, num_generated)}))
        except Exception as exc:
            yield sse_error(exc)
        finally:
            stream.abort()
        yield sse("[DONE]")

    def _logprobs(self, c: CompletionOutput, start: int, num_top: int | None) -> dict | None:
        """OpenAI's chat logprobs for the tokens c.token_ids[start:]."""
        if num_top is None:
            return None
        steps = c.logprobs or []
        content = []
        for pos in range(start, len(c.token_ids)):
            token_id = c.token_ids[pos]
            step: dict[int, Logprob] = steps[pos] if pos < len(steps) else {}
            chosen = step.get(token_id)
            content.append({
                **self._entry(token_id, chosen),
                "top_logprobs": [self._entry(t, lp) for t, lp in top_entries(step, num_top)],
            })
        return {"content": content}

    def _entry(self, token_id: int, logprob: Logprob | None) -> dict:
        text = token_text(self.tokenizer, token_id, logprob)
        value = clamp_logprob(logprob.logprob) if logprob is not None else None
        return {"token": text, "logprob": value, "bytes": list(text.encode("utf-8"))}


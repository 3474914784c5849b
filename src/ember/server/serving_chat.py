"""POST /v1/chat/completions: chat template -> engine request -> chat.completion(.chunk) bodies."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from ember.outputs import CompletionOutput, Logprob
from ember.server.async_engine import RequestStream
from ember.server.errors import APIError, sse_error
from ember.server.protocol import ChatCompletionRequest
from ember.server.serving import (OpenAIServing, SSEResponse, clamp_logprob, merge_streams, now_s, sse,
                                  token_text, top_entries, usage)


class OpenAIServingChat(OpenAIServing):
    """Chat completions, streamed or not."""

    async def create_chat_completion(self, req: ChatCompletionRequest, receive: Receive) -> Response:
        self.check_model(req.model)
        _check_supported(req)
        prompt = await self.render_chat(req.messages, req.add_generation_prompt)
        # The template already carries any BOS token, so none is added again (as vLLM does).
        prompt_ids = await self.encode(prompt, add_special_tokens=False)
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        max_tokens = self.resolve_max_tokens(len(prompt_ids), requested)
        num_top = (req.top_logprobs or 0) if req.logprobs else None
        if req.top_logprobs is not None and not req.logprobs and req.top_logprobs > 0:
            raise APIError("top_logprobs requires logprobs=true", 400, "top_logprobs")
        params = self.sampling_params(req, max_tokens, num_top)
        [stream] = await self.submit("chatcmpl", [prompt_ids], params)
        meta = {"id": stream.request_id, "created": now_s(), "model": self.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._stream(stream, meta, req.n, num_top, include_usage))
        finals = await self.collect(receive, [stream])
        if finals is None:
            return Response(status_code=499)  # nobody is listening any more
        return JSONResponse(self._full_body(finals[0], meta, num_top))

    def _full_body(self, output: Any, meta: dict, num_top: int | None) -> dict:
        choices = []
        for c in sorted(output.outputs, key=lambda c: c.index):
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": self._logprobs(c, 0, num_top),
                "finish_reason": c.finish_reason,
                "stop_reason": c.stop_reason,
            })
        num_generated = sum(len(c.token_ids) for c in output.outputs)
        return {**meta, "object": "chat.completion", "choices": choices,
                "usage": usage(len(output.prompt_token_ids), num_generated)}

    async def _stream(self, stream: RequestStream, meta: dict, n: int, num_top: int | None,
                      include_usage: bool) -> AsyncIterator[str]:
        head = {**meta, "object": "chat.completion.chunk"}

        def chunk(index: int, delta: dict, logprobs: Any = None, finish: Any = None, stop: Any = None) -> str:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            if finish is not None:
                choice["stop_reason"] = stop
            return sse(json.dumps({**head, "choices": [choice]}))

        sent_text, sent_tokens, done = [0] * n, [0] * n, [False] * n
        num_prompt_tokens = num_generated = 0
        try:
            async for _, output in merge_streams([stream]):
                if num_prompt_tokens == 0:  # the role goes first, once the engine has begun (as vLLM)
                    for i in range(n):
                        yield chunk(i, {"role": "assistant", "content": ""})
                num_prompt_tokens = len(output.prompt_token_ids)
                for c in output.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    text, n_tokens = c.text[sent_text[i]:], len(c.token_ids)
                    if text or n_tokens > sent_tokens[i] or c.finish_reason:
                        yield chunk(i, {"content": text} if text else {},
                                    self._logprobs(c, sent_tokens[i], num_top), c.finish_reason,
                                    c.stop_reason)
                    sent_text[i], sent_tokens[i] = len(c.text), n_tokens
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


def _check_supported(req: ChatCompletionRequest) -> None:
    if req.tools:
        raise APIError("tools are not supported", 501, "tools")
    if req.tool_choice not in (None, "none"):
        raise APIError("tool_choice is not supported", 501, "tool_choice")
    if req.response_format and req.response_format.get("type") not in (None, "text"):
        raise APIError("response_format other than text is not supported", 501, "response_format")

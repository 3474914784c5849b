"""POST /v1/completions: one or many prompts (text or token ids) -> text_completion bodies."""

from __future__ import annotations

import json
from typing import Any, AsyncIterator

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from ember.outputs import CompletionOutput
from ember.server.async_engine import RequestStream
from ember.server.errors import APIError, sse_error
from ember.server.protocol import CompletionRequest
from ember.server.serving import (OpenAIServing, SSEResponse, clamp_logprob, merge_streams, now_s, sse,
                                  token_text, top_entries, usage)


class OpenAIServingCompletion(OpenAIServing):
    """Legacy completions; choice index = prompt index * n + sample index, as in vLLM."""

    async def create_completion(self, req: CompletionRequest, receive: Receive) -> Response:
        self.check_model(req.model)
        if req.suffix:
            raise APIError("suffix is not supported", 501, "suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError("best_of other than n is not supported", 501, "best_of")
        if req.echo and req.logprobs is not None:
            raise APIError("echo with logprobs (prompt logprobs) is not supported", 501, "echo")
        prompts = await self._prompt_token_ids(req)
        streams = await self._submit_each(prompts, req)
        echoes = [await self._echo_text(p) if req.echo else "" for p in prompts]
        meta = {"id": streams[0].request_id, "created": now_s(), "model": self.model_name}
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return SSEResponse(self._stream(streams, meta, req, echoes, include_usage))
        finals = await self.collect(receive, streams)
        if finals is None:
            return Response(status_code=499)
        return JSONResponse(self._full_body(finals, meta, req, echoes))

    async def _prompt_token_ids(self, req: CompletionRequest) -> list[list[int]]:
        prompt = req.prompt
        if isinstance(prompt, str):
            prompt = [prompt]
        if not prompt:
            raise APIError("prompt must not be empty", 400, "prompt")
        if isinstance(prompt[0], int):
            prompt = [prompt]
        out = []
        for p in prompt:
            ids = await self.encode(p, req.add_special_tokens) if isinstance(p, str) else list(p)
            self.check_token_ids(ids)
            out.append(ids)
        return out

    async def _submit_each(self, prompts: list[list[int]], req: CompletionRequest) -> list[RequestStream]:
        """Each prompt gets its own max_tokens default (what fits after it); all are checked first."""
        params = [self.sampling_params(req, self.resolve_max_tokens(len(ids), req.max_tokens), req.logprobs)
                  for ids in prompts]
        streams: list[RequestStream] = []
        try:
            for token_ids, p in zip(prompts, params):
                streams.extend(await self.submit("cmpl", [token_ids], p))
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        return streams

    async def _echo_text(self, token_ids: list[int]) -> str:
        return await self.run_tokenizer(lambda: self.tokenizer.decode(token_ids, skip_special_tokens=False))

    def _full_body(self, finals: list[Any], meta: dict, req: CompletionRequest, echoes: list[str]) -> dict:
        choices, num_prompt = [], 0
        num_generated = 0
        for p, output in enumerate(finals):
            num_prompt += len(output.prompt_token_ids)
            for c in sorted(output.outputs, key=lambda c: c.index):
                num_generated += len(c.token_ids)
                choices.append({
                    "index": p * req.n + c.index,
                    "text": echoes[p] + c.text,
                    "logprobs": self._logprobs(c, 0, req.logprobs, len(echoes[p])),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                })
        return {**meta, "object": "text_completion", "choices": choices,
                "usage": usage(num_prompt, num_generated)}

    async def _stream(self, streams: list[RequestStream], meta: dict, req: CompletionRequest,
                      echoes: list[str], include_usage: bool) -> AsyncIterator[str]:
        head = {**meta, "object": "text_completion"}
        n = req.n
        sent_text, sent_tokens = [[0] * n for _ in streams], [[0] * n for _ in streams]
        offsets = [[len(e)] * n for e in echoes]
        done = [[False] * n for _ in streams]
        num_prompt, num_generated = [0] * len(streams), [0] * len(streams)
        try:
            async for p, output in merge_streams(streams):
                num_prompt[p] = len(output.prompt_token_ids)
                for c in output.outputs:
                    i = c.index
                    if done[p][i]:
                        continue
                    text, n_tokens = c.text[sent_text[p][i]:], len(c.token_ids)
                    if sent_tokens[p][i] == 0 and echoes[p]:
                        text = echoes[p] + text
                    if text or n_tokens > sent_tokens[p][i] or c.finish_reason:
                        choice = {"index": p * n + i, "text": text,
                                  "logprobs": self._logprobs(c, sent_tokens[p][i], req.logprobs, offsets[p][i]),
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                        yield sse(json.dumps({**head, "choices": [choice]}))
                    offsets[p][i] += len(c.text) - sent_text[p][i]
                    sent_text[p][i], sent_tokens[p][i] = len(c.text), n_tokens
                    done[p][i] = c.finish_reason is not None
                num_generated[p] = sum(len(c.token_ids) for c in output.outputs)
            if include_usage:
                yield sse(json.dumps({**head, "choices": [], "usage": usage(sum(num_prompt), sum(num_generated))}))
        except Exception as exc:
            yield sse_error(exc)
        finally:
            for stream in streams:
                stream.abort()
        yield sse("[DONE]")

    def _logprobs(self, c: CompletionOutput, start: int, num_top: int | None, offset: int) -> dict | None:
        """OpenAI's completions logprobs for c.token_ids[start:]; offsets count from `offset`."""
        if num_top is None:
            return None
        steps = c.logprobs or []
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for pos in range(start, len(c.token_ids)):
            token_id = c.token_ids[pos]
            step = steps[pos] if pos < len(steps) else {}
            chosen = step.get(token_id)
            text = token_text(self.tokenizer, token_id, chosen)
            out["tokens"].append(text)
            out["token_logprobs"].append(clamp_logprob(chosen.logprob) if chosen is not None else None)
            # The k best plus the chosen token, as OpenAI documents.
            top = {token_text(self.tokenizer, t, lp): clamp_logprob(lp.logprob)
                   for t, lp in top_entries(step, num_top)}
            if chosen is not None:
                top.setdefault(text, clamp_logprob(chosen.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        return out

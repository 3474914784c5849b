"""POST /v1/completions: one or many prompts (text or token ids) -> text_completion bodies."""

from __future__ import annotations

import dataclasses
import json
from typing import Any, AsyncIterator

from starlette.responses import JSONResponse, Response
from starlette.types import Receive

from ember.lora.request import LoRARequest
from ember.outputs import CompletionOutput
from ember.sampling_params import StructuredOutputsParams
from ember.server.async_engine import RequestStream
from ember.server.errors import APIError, sse_error
from ember.server.field_policy import check_request_fields
from ember.server.protocol import CompletionRequest
from ember.server.serving import (OpenAIServing, SSEResponse, clamp_logprob, merge_streams, now_s,
                                  prompt_logprobs_body, reply_id, sse, stream_usage, token_text, top_entries,
                                  usage)


class OpenAIServingCompletion(OpenAIServing):
    """Legacy completions; choice index = prompt index * n + sample index, as in vLLM.

    `echo` puts the prompt before the text; with `logprobs` the prompt's tokens come first in the
    logprobs too (the first with null logprob), scored as vLLM's prompt logprobs. `max_tokens: 0`
    (echo only) runs one token, as vLLM does, and returns just the prompt.
    """

    async def create_completion(self, req: CompletionRequest, receive: Receive) -> Response:
        lora_request = self.check_model(req.model)
        prompts = await self._prompt_token_ids(req)
        streams = await self._submit_each(prompts, req, await self.structured_outputs(req), lora_request)
        echoes = [await self._echo_text(p) if req.echo else "" for p in prompts]
        meta = {"id": reply_id("cmpl", req, streams[0]), "created": now_s(), "model": self.reply_model(lora_request)}
        if req.stream:
            return SSEResponse(self._stream(streams, meta, req, echoes, stream_usage(req)))
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
        out, keep = [], self.prompt_truncation(req)
        for p in prompt:
            ids = await self.encode_prompt(p if isinstance(p, str) else list(p), req.add_special_tokens, keep)
            self.check_token_ids(ids)
            out.append(ids)
        return out

    async def _submit_each(self, prompts: list[list[int]], req: CompletionRequest,
                           structured_outputs: StructuredOutputsParams | None,
                           lora_request: LoRARequest | None) -> list[RequestStream]:
        """Each prompt gets its own max_tokens default (what fits after it); all are checked first."""
        max_tokens = 1 if _echo_only(req) else req.max_tokens
        params = [self.sampling_params(req, self.resolve_max_tokens(len(ids), max_tokens), req.logprobs,
                                       structured_outputs)
                  for ids in prompts]
        if req.echo and req.logprobs is not None and req.prompt_logprobs is None:  # vLLM scores the echoed prompt
            params = [p.clone(prompt_logprobs=req.logprobs) for p in params]
        check_request_fields(req, "completions")  # last: a 501 only for an otherwise valid request
        streams: list[RequestStream] = []
        try:
            for token_ids, p in zip(prompts, params):
                streams.extend(await self.submit("cmpl", [token_ids], p, lora_request))
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
                c = _prompt_only(c) if _echo_only(req) else c
                num_generated += len(c.token_ids)
                choices.append({
                    "index": p * req.n + c.index,
                    "text": echoes[p] + c.text,
                    "logprobs": self._logprobs(output, c, 0, req, len(echoes[p]), with_prompt=req.echo),
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                })
                if req.prompt_logprobs is not None:
                    choices[-1]["prompt_logprobs"] = prompt_logprobs_body(output.prompt_logprobs)
        return {**meta, "object": "text_completion", "choices": choices,
                "usage": usage(num_prompt, num_generated)}

    async def _stream(self, streams: list[RequestStream], meta: dict, req: CompletionRequest,
                      echoes: list[str], usage_options: tuple[bool, bool]) -> AsyncIterator[str]:
        """The chunks; `usage_options` is (include_usage, continuous_usage_stats): a last chunk with the
        usage, and in every chunk its choice's usage so far (its prompt, its tokens; as vLLM)."""
        head = {**meta, "object": "text_completion"}
        include_usage, continuous_usage = usage_options
        n = req.n
        sent_text, sent_tokens = [[0] * n for _ in streams], [[0] * n for _ in streams]
        offsets = [[len(e)] * n for e in echoes]
        done, echoed = [[False] * n for _ in streams], [[not req.echo] * n for _ in streams]
        num_prompt, num_generated = [0] * len(streams), [0] * len(streams)
        try:
            async for p, output in merge_streams(streams):
                num_prompt[p] = len(output.prompt_token_ids)
                for c in output.outputs:
                    i = c.index
                    if done[p][i] or (_echo_only(req) and not c.finished()):
                        continue
                    c = _prompt_only(c) if _echo_only(req) else c
                    text, n_tokens = c.text[sent_text[p][i]:], len(c.token_ids)
                    first = not echoed[p][i]  # the prompt (and its logprobs) go in the first chunk
                    if first:
                        text = echoes[p] + text
                    if text or n_tokens > sent_tokens[p][i] or c.finish_reason or first:
                        logprobs = self._logprobs(output, c, sent_tokens[p][i], req, offsets[p][i], first)
                        choice = {"index": p * n + i, "text": text, "logprobs": logprobs,
                                  "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
                        body = {**head, "choices": [choice]}
                        if continuous_usage:
                            body["usage"] = usage(num_prompt[p], n_tokens)
                        yield sse(json.dumps(body))
                        echoed[p][i] = True
                    offsets[p][i] += len(c.text) - sent_text[p][i]
                    sent_text[p][i], sent_tokens[p][i] = len(c.text), n_tokens
                    done[p][i] = c.finish_reason is not None
                num_generated[p] = 0 if _echo_only(req) else sum(len(c.token_ids) for c in output.outputs)
            if include_usage:
                yield sse(json.dumps({**head, "choices": [], "usage": usage(sum(num_prompt), sum(num_generated))}))
        except Exception as exc:
            yield sse_error(exc)
        finally:
            for stream in streams:
                stream.abort()
        yield sse("[DONE]")

    def _logprobs(self, output: Any, c: CompletionOutput, start: int, req: CompletionRequest, offset: int,
                  with_prompt: bool) -> dict | None:
        """OpenAI's completions logprobs for c.token_ids[start:], offsets counting from `offset`; with
        `with_prompt` the prompt's tokens come first (offsets from 0), as vLLM echoes them."""
        if req.logprobs is None:
            return None
        out = self._token_logprobs(c.token_ids[start:], (c.logprobs or [])[start:], req.logprobs, offset)
        if with_prompt:
            prompt = self._token_logprobs(output.prompt_token_ids, output.prompt_logprobs or [], req.logprobs, 0)
            out = {key: prompt[key] + out[key] for key in out}
        return out

    def _token_logprobs(self, token_ids: list[int], steps: list, num_top: int, offset: int) -> dict:
        """tokens, token_logprobs, top_logprobs, text_offset of `token_ids`; steps[i] is token i's Logprob
        dict (None: a first prompt token, which has no logprob and no top_logprobs)."""
        out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for pos, token_id in enumerate(token_ids):
            step = steps[pos] if pos < len(steps) else {}
            chosen = step.get(token_id) if step is not None else None
            text = token_text(self.tokenizer, token_id, chosen)
            out["tokens"].append(text)
            out["token_logprobs"].append(clamp_logprob(chosen.logprob) if chosen is not None else None)
            top = None
            if step is not None:  # the k best plus the chosen token, as OpenAI documents
                top = {token_text(self.tokenizer, t, lp): clamp_logprob(lp.logprob)
                       for t, lp in top_entries(step, num_top)}
                if chosen is not None:
                    top.setdefault(text, clamp_logprob(chosen.logprob))
            out["top_logprobs"].append(top)
            out["text_offset"].append(offset)
            offset += len(text)
        return out


def _echo_only(req: CompletionRequest) -> bool:
    """`echo` with `max_tokens: 0`: the answer is the prompt alone."""
    return bool(req.echo) and req.max_tokens == 0


def _prompt_only(c: CompletionOutput) -> CompletionOutput:
    """A sample as `max_tokens: 0` shows it: the one token run for the prompt's sake is dropped."""
    return dataclasses.replace(c, text="", token_ids=[], cumulative_logprob=None,
                               logprobs=None if c.logprobs is None else [], stop_reason=None,
                               finish_reason="length" if c.finished() else None)

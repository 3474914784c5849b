"""One streamed request to an OpenAI-compatible server, timed chunk by chunk."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import httpx

from ember.benchmarks.datasets import SampleRequest


@dataclass
class RequestResult:
    """Timings of one request (seconds); `output_len` is the server's completion_tokens."""

    success: bool = False
    prompt_len: int = 0
    output_len: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)  # gaps between successive content chunks
    start_time: float = 0.0
    error: str = ""


@dataclass(frozen=True)
class Target:
    base_url: str
    model: str
    backend: str = "openai"  # "openai" -> /v1/completions, "openai-chat" -> /v1/chat/completions
    api_key: str | None = None
    ignore_eos: bool = False
    temperature: float = 0.0

    @property
    def endpoint(self) -> str:
        return "/v1/chat/completions" if self.backend == "openai-chat" else "/v1/completions"


def build_body(target: Target, request: SampleRequest) -> dict:
    body = {"model": target.model, "max_tokens": request.expected_output_len, "stream": True,
            "stream_options": {"include_usage": True}, "temperature": target.temperature,
            "ignore_eos": target.ignore_eos}
    if target.backend == "openai-chat":
        body["messages"] = [{"role": "user", "content": request.prompt}]
    else:
        body["prompt"] = request.prompt
    return body


def _delta_text(chunk: dict) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    choice = choices[0]
    return choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def send_request(client: httpx.AsyncClient, target: Target, request: SampleRequest) -> RequestResult:
    """POST one streaming request; never raises, failures are recorded in the result."""
    result = RequestResult(prompt_len=request.prompt_len)
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    start = result.start_time = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", target.base_url + target.endpoint, json=build_body(target, request),
                                 headers=headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"].get("message"))
                    return result
                now = time.perf_counter()
                if _delta_text(chunk):
                    if result.ttft == 0.0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                if chunk.get("usage"):
                    result.output_len = chunk["usage"]["completion_tokens"]
                    result.prompt_len = chunk["usage"]["prompt_tokens"]
        result.latency = time.perf_counter() - start
        result.success = result.ttft > 0.0 or result.output_len > 0
        if not result.success:
            result.error = "no output"
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result

"""Server options (network, auth, admission limits, chat template and output parsers): one frozen dataclass
whose fields are CLI flags."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ember.reasoning import REASONING_PARSER_REGISTRY
from ember.server.tool_parsers import TOOL_PARSER_REGISTRY


@dataclass(frozen=True)
class ServerConfig:
    """How `ember serve` listens and which requests it admits; validated once, never mutated.

    A request is *queued* from the moment it is admitted until its first token arrives; the
    queue limits bound that backlog, and a request beyond them gets 429 with a Retry-After.
    """

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "TCP port to listen on"})
    api_key: str | None = field(default=None, metadata={
        "help": "require 'Authorization: Bearer KEY' on /v1/* (default: no auth)"})
    served_model_name: str | None = field(default=None, metadata={
        "help": "model id clients send and /v1/models lists (default: the engine's model name)"})
    max_queued_requests: int = field(default=256, metadata={
        "help": "most admitted requests still waiting for their first token"})
    max_queued_tokens: int = field(default=65536, metadata={
        "help": "most prompt tokens summed over the queued requests"})
    max_request_body_bytes: int = field(default=4 * 1024 * 1024, metadata={
        "help": "larger request bodies are refused with 413"})
    max_n: int = field(default=16, metadata={"help": "largest n (samples per prompt) a request may ask for"})
    max_logprobs: int = field(default=20, metadata={"help": "largest logprobs / top_logprobs a request may ask for"})
    retry_after_s: int = field(default=1, metadata={"help": "Retry-After seconds sent with 429 and 503"})
    log_level: str = field(default="info", metadata={"help": "uvicorn log level"})
    shutdown_timeout_s: float = field(default=30.0, metadata={
        "help": "on SIGTERM: admit nothing new, let requests in flight finish for up to this many seconds, "
                "then end the rest with a 503 error"})
    chat_template: str | None = field(default=None, metadata={
        "help": "Jinja chat template file for every chat request (default: the model's; tool requests on a "
                "model whose template has no tool section use ember's Hermes template)"})
    tool_call_parser: str = field(default="hermes", metadata={
        "help": "how tool_choice=auto finds calls in the output: hermes, llama3_json or mistral"})
    reasoning_parser: str | None = field(default=None, metadata={
        "help": "split <think> reasoning into reasoning_content: deepseek_r1 or qwen3 (default: none)"})
    lora_modules: tuple[str, ...] = field(default=(), metadata={
        "nargs": "+", "type": str,
        "help": "LoRA adapters served under their own model names: name=PATH (a PEFT directory) or JSON "
                '{"name": ..., "path": ...}; needs --enable-lora'})

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        for name in ("max_queued_requests", "max_queued_tokens", "max_request_body_bytes", "max_n"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.max_logprobs < 0:
            raise ValueError(f"max_logprobs must be non-negative, got {self.max_logprobs}")
        if self.retry_after_s < 0:
            raise ValueError(f"retry_after_s must be non-negative, got {self.retry_after_s}")
        if not self.shutdown_timeout_s >= 0:
            raise ValueError(f"shutdown_timeout_s must be non-negative, got {self.shutdown_timeout_s}")
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")
        self._check_chat_options()
        object.__setattr__(self, "lora_modules", tuple(self.lora_modules))  # argparse gives a list
        self.lora_paths()  # a malformed --lora-modules entry fails here

    def lora_paths(self) -> dict[str, str]:
        """`--lora-modules` as {name: path}. Raises ValueError for an entry that is neither form."""
        paths: dict[str, str] = {}
        for entry in self.lora_modules:
            name, path = _lora_module(entry)
            if not name or not path or name in paths:
                raise ValueError(f"lora_modules entry {entry!r} must be name=PATH or "
                                 '{"name": ..., "path": ...} with a new, non-empty name')
            paths[name] = path
        return paths

    def _check_chat_options(self) -> None:
        if self.tool_call_parser not in TOOL_PARSER_REGISTRY:
            raise ValueError(f"tool_call_parser must be one of {sorted(TOOL_PARSER_REGISTRY)}, "
                             f"got {self.tool_call_parser!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSER_REGISTRY:
            raise ValueError(f"reasoning_parser must be one of {sorted(REASONING_PARSER_REGISTRY)}, "
                             f"got {self.reasoning_parser!r}")
        if self.chat_template is not None and not os.path.isfile(self.chat_template):
            raise ValueError(f"chat_template {self.chat_template!r} is not a file")


def _lora_module(entry: str) -> tuple[str | None, str | None]:
    if entry.lstrip().startswith("{"):
        try:
            spec = json.loads(entry)
        except json.JSONDecodeError:
            return None, None
        return (spec.get("name"), spec.get("path")) if isinstance(spec, dict) else (None, None)
    name, sep, path = entry.partition("=")
    return (name, path) if sep else (None, None)

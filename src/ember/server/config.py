"""Server options (network, auth, admission limits): one frozen dataclass whose fields are CLI flags."""

from __future__ import annotations

from dataclasses import dataclass, field


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
        if self.api_key is not None and not self.api_key:
            raise ValueError("api_key must not be empty")

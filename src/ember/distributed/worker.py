"""The worker side: one `LLMEngine` inside a worker process, driven call by call from a front end."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

from ember.config import EngineConfig
from ember.engine.llm_engine import EngineStats, LLMEngine
from ember.outputs import RequestOutput


@dataclass
class WorkerInfo:
    """What a front end needs to know about the engine a worker built."""

    pid: int
    model_name: str
    model_config: Any  # the model's ModelConfig
    config: EngineConfig  # as the engine resolved it (max_model_len filled in)
    eos_token_id: int | None


@dataclass
class StepResult:
    """One engine step seen from the front end: the outputs and the stats right after it."""

    outputs: list[RequestOutput]
    stats: EngineStats


def build_engine(config: EngineConfig) -> LLMEngine:
    """The default worker engine: the model the config names, loaded in this process."""
    return LLMEngine.from_config(config)


class EngineWorker:
    """Owns one engine; every public method is one remote call (a Ray actor method or a pool task).

    Args:
        build: a picklable function returning the engine (`build_engine`, or a model-parallel rank's).
        args: its arguments.
    """

    def __init__(self, build: Callable[..., LLMEngine], *args: Any) -> None:
        self.engine = build(*args)

    def describe(self) -> WorkerInfo:
        engine = self.engine
        return WorkerInfo(os.getpid(), engine.model_name, engine.model_config, engine.config, engine.eos_token_id)

    def ping(self) -> int:
        return os.getpid()

    def add_request(self, request_id: str, prompt: str | list[int], params, cache_salt: str | None = None,
                    lora_request=None) -> None:
        """`LLMEngine.add_request`; its ValueError comes back to the caller."""
        self.engine.add_request(request_id, prompt, params, cache_salt=cache_salt, lora_request=lora_request)

    def abort_request(self, request_ids: list[str]) -> None:
        self.engine.abort_request(request_ids)

    def step(self) -> StepResult:
        """One engine step (nothing when idle)."""
        outputs = self.engine.step() if self.engine.has_unfinished_requests() else []
        return StepResult(outputs, self.engine.get_stats())

    def get_stats(self) -> EngineStats:
        return self.engine.get_stats()

    def call(self, fn: Callable[[LLMEngine], Any]) -> Any:
        """Run `fn(engine)` here (tests and admin calls)."""
        return fn(self.engine)

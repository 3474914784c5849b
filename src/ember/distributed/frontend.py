"""The driver side shared by every distributed mode: what `LLM` and the server read from an engine
(tokenizer, config, grammar compiler, request ids, stats), with the model itself in worker processes."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field, fields

from ember.config import EngineConfig, default_num_threads
from ember.distributed.config import ParallelConfig
from ember.distributed.worker import WorkerInfo
from ember.engine.llm_engine import EngineStats
from ember.loader.model_loader import resolve_model_path
from ember.loader.tokenizer import Tokenizer
from ember.outputs import CompletionOutput, RequestOutput


@dataclass
class ClusterStats(EngineStats):
    """Stats summed over the engines (gauges and totals), plus each engine's own under its label."""

    engines: dict[str, EngineStats | None] = field(default_factory=dict)  # None: the engine is down
    kv_transfer_bytes: int = 0  # P/D: KV bytes moved between workers
    kv_transfer_seconds: float = 0.0  # P/D: time spent moving them

    @classmethod
    def combine(cls, engines: dict[str, EngineStats | None], **extra) -> "ClusterStats":
        live = [s for s in engines.values() if s is not None]
        sums = {}
        for f in fields(EngineStats):
            values = [getattr(s, f.name) for s in live]
            if f.name == "spec_decoding":
                sums[f.name] = None
            elif f.name in ("kv_cache_usage", "kv_cache_fragmentation"):  # fractions: the mean
                sums[f.name] = sum(values) / len(values) if values else 0.0
            else:
                sums[f.name] = sum(values)
        return cls(**sums, engines=engines, **extra)


def worker_engine_config(config: EngineConfig, num_workers: int) -> EngineConfig:
    """The config each worker's engine gets: its share of this machine's cores when threads are not set."""
    if config.num_threads is not None:
        return config
    return config.replace(num_threads=max(1, default_num_threads() // num_workers))


def failed_output(request_id: str, prompt_token_ids: list[int], error: str) -> RequestOutput:
    """A finished output that ends a request with an error the caller sees (a server answers 503:
    the request was fine, the worker serving it was not)."""
    output = RequestOutput(request_id, None, list(prompt_token_ids),
                           [CompletionOutput(0, "", [], finish_reason="abort")], finished=True)
    output.extra.update(error=error, status=503)
    return output


class DistributedEngine:
    """Looks like an `LLMEngine` to `LLM` and the server; subclasses place requests on workers.

    Subclasses implement `add_request`, `abort_request`, `step`, `has_unfinished_requests`, `get_stats`
    and `shutdown`, and call `_adopt` with the first worker's `WorkerInfo`.
    """

    mode = "distributed"  # named in the errors of what a mode does not support

    def __init__(self, config: EngineConfig, parallel_config: ParallelConfig) -> None:
        self.parallel_config = parallel_config
        self.tokenizer = Tokenizer.from_path(resolve_model_path(config.model))
        self.config = config
        self.lora = None
        self._structured_output = None
        self._counter = itertools.count()

    def _adopt(self, info: WorkerInfo) -> None:
        self.model_name = info.model_name
        self.model_config = info.model_config
        self.config = info.config
        self.eos_token_id = info.eos_token_id

    @property
    def structured_output(self):
        """A grammar compiler here too: callers compile once to reject a bad grammar before submitting."""
        if self._structured_output is None:
            from ember.structured_output.manager import StructuredOutputManager

            self._structured_output = StructuredOutputManager(self.tokenizer.hf, self.model_config.vocab_size)
        return self._structured_output

    def new_request_id(self) -> str:
        return str(next(self._counter))

    def poll_workers(self) -> None:
        """Housekeeping while no request runs (the server's engine loop calls it when idle, as it would
        `step`): nothing here; an engine whose restarted workers rejoin on an answer looks for it."""

    def _unsupported(self, what: str) -> ValueError:
        return ValueError(f"{what} is not supported with {self.mode}")

    def _check_request(self, lora_request) -> None:
        if lora_request is not None:
            raise self._unsupported("LoRA adapters")

    def check_lora(self, lora_request) -> None:
        raise self._unsupported("LoRA adapters")

    def release_lora(self, lora_name: str) -> None:
        pass

    def busy_lora_slots(self) -> set[int]:
        return set()

    def set_precision(self, ops=None, default_precision: str | None = None):
        raise self._unsupported("changing the precision mask")

    def get_precision(self):
        raise self._unsupported("the precision mask")

    def set_request_precision(self, request_id: str, precision: str = "bf16") -> int:
        raise self._unsupported("switching a request's precision")

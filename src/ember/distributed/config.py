"""How the engine is spread over worker processes: one frozen dataclass whose fields are also CLI flags."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

EXECUTOR_BACKENDS = ("ray", "mp")
ROUTING_POLICIES = ("prefix", "round_robin", "least_loaded")


@dataclass(frozen=True)
class ParallelConfig:
    """Data, tensor and pipeline parallel sizes and prefill/decode disaggregation (vLLM's names).

    The default (every size 1, no disaggregation) is one engine in the calling process.
    """

    data_parallel_size: int = field(default=1, metadata={"aliases": ("-dp",),
        "help": "engine replicas behind one front end; a request goes to the replica holding the longest "
                "cached prefix of its prompt, else to the least loaded"})
    tensor_parallel_size: int = field(default=1, metadata={"aliases": ("-tp",),
        "help": "ranks that split every layer (attention heads, MLP columns, vocabulary) and all-reduce over gloo"})
    pipeline_parallel_size: int = field(default=1, metadata={"aliases": ("-pp",),
        "help": "ranks that each hold a contiguous share of the layers"})
    distributed_executor_backend: str = field(default="ray", metadata={
        "help": "where workers run: ray (actors, restarted when they die) or mp (local processes)"})
    routing_policy: str = field(default="prefix", metadata={
        "help": "data parallel: prefix (longest cached prefix, else least loaded), round_robin or least_loaded"})
    pd_disaggregation: bool = field(default=False, metadata={
        "help": "prefill on prefill workers, decode on decode workers; KV blocks move through a shared pool"})
    num_prefill_workers: int = field(default=1, metadata={"help": "with --pd-disaggregation"})
    num_decode_workers: int = field(default=1, metadata={"help": "with --pd-disaggregation"})
    kv_transfer_config: str | None = field(default=None, metadata={
        "help": 'JSON in vLLM\'s spirit, e.g. {"kv_connector": "EmberKVPool", "num_prefill_workers": 1, '
                '"num_decode_workers": 1}; implies --pd-disaggregation'})
    max_worker_restarts: int = field(default=3, metadata={
        "help": "times Ray restarts a dead worker (its requests are retried elsewhere or fail)"})
    worker_timeout_s: float = field(default=120.0, metadata={
        "help": "a worker that does not answer a call within this long counts as dead"})

    def __post_init__(self) -> None:
        for name in ("data_parallel_size", "tensor_parallel_size", "pipeline_parallel_size",
                     "num_prefill_workers", "num_decode_workers"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {EXECUTOR_BACKENDS}, "
                             f"got {self.distributed_executor_backend!r}")
        if self.routing_policy not in ROUTING_POLICIES:
            raise ValueError(f"routing_policy must be one of {ROUTING_POLICIES}, got {self.routing_policy!r}")
        if self.max_worker_restarts < 0 or self.worker_timeout_s <= 0:
            raise ValueError("max_worker_restarts must be >= 0 and worker_timeout_s positive")
        if self.kv_transfer_config is not None:
            self._apply_kv_transfer_config()
        modes = [self.data_parallel_size > 1, self.pd_disaggregation,
                 self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1]
        if sum(modes) > 1:
            raise ValueError("data parallel, prefill/decode disaggregation and tensor/pipeline parallel are "
                             "separate modes here; pick one")
        if self.tensor_parallel_size > 1 and self.pipeline_parallel_size > 1:
            raise ValueError("tensor and pipeline parallel cannot be combined yet; pick one")

    def _apply_kv_transfer_config(self) -> None:
        try:
            spec = json.loads(self.kv_transfer_config)
        except json.JSONDecodeError as exc:
            raise ValueError(f"kv_transfer_config is not valid JSON: {exc}") from None
        if not isinstance(spec, dict):
            raise ValueError("kv_transfer_config must be a JSON object")
        connector = spec.get("kv_connector", "EmberKVPool")
        if connector != "EmberKVPool":
            raise ValueError(f"unknown kv_connector {connector!r}; this engine has EmberKVPool")
        object.__setattr__(self, "pd_disaggregation", True)
        for key in ("num_prefill_workers", "num_decode_workers"):
            if key in spec:
                if not isinstance(spec[key], int) or spec[key] < 1:
                    raise ValueError(f"kv_transfer_config {key} must be a positive integer")
                object.__setattr__(self, key, spec[key])

    @property
    def is_distributed(self) -> bool:
        """Whether the engine runs in worker processes at all."""
        return (self.data_parallel_size > 1 or self.tensor_parallel_size > 1
                or self.pipeline_parallel_size > 1 or self.pd_disaggregation)

    @property
    def world_size(self) -> int:
        """Ranks of one model-parallel engine."""
        return self.tensor_parallel_size * self.pipeline_parallel_size

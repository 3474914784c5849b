"""The worker side of a model-parallel engine: one rank's `LLMEngine` on its shard or stage of the model.

Every rank runs a whole engine (scheduler, KV-cache manager, runner) and is sent the same requests and
steps in the same order, so every rank schedules the same batches (SGLang's one scheduler per rank);
only the model differs. A rank starts in two calls: `free_address` (rank 0 only: where the group meets)
and `start`, which loads the model, joins the group and builds the engine.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ember.attention.layer_cache import KVCacheSpec
from ember.config import EngineConfig, default_num_threads
from ember.distributed.config import ParallelConfig
from ember.distributed.parallel.pipeline_parallel import (PipelineModelRunner, build_pipeline_stage,
                                                          check_pipeline_parallel)
from ember.distributed.parallel.process_group import GroupCoordinator, create_gloo_group, free_address
from ember.distributed.parallel.tensor_parallel import build_tensor_parallel_model, check_tensor_parallel
from ember.distributed.worker import EngineWorker, StepResult, WorkerInfo
from ember.engine.llm_engine import LLMEngine
from ember.loader.model_loader import load_state, resolve_model_path
from ember.loader.tokenizer import Tokenizer
from ember.models.config import ModelConfig
from ember.quant.checkpoint import QUANT_CONFIG_NAME


@dataclass
class RankEngine:
    """One rank's engine, the full model's config (the engine's own describes the shard) and its group."""

    engine: LLMEngine
    model_config: ModelConfig
    group: GroupCoordinator


def check_float_checkpoint(path: str) -> None:
    """Raise ValueError for a quantized checkpoint: model parallel shards float weights only."""
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, QUANT_CONFIG_NAME)):
        raise ValueError(f"{path} is a quantized checkpoint; tensor and pipeline parallel run float "
                         "(bfloat16/float32) models only")


def agreed_num_blocks(config: EngineConfig, bytes_per_block: int, group: GroupCoordinator) -> int:
    """KV blocks every rank can hold (the smallest rank's count): ranks must run out of cache together,
    or their schedulers would preempt differently."""
    mine = config.num_kv_blocks or int(config.kv_cache_memory_gib * 2**30 // bytes_per_block)
    return min(int(n) for n in group.all_gather(torch.tensor([mine], dtype=torch.int64)))


def build_rank_engine(config: EngineConfig, parallel_config: ParallelConfig, rank: int,
                      init_method: str) -> RankEngine:
    """Load the model, join the group at `init_method` and build rank `rank`'s engine on its part.

    The model's checks run before joining, so a model every rank refuses fails fast on all of them.

    Raises:
        ValueError: a quantized checkpoint, or a model that cannot be split this way.
    """
    torch.set_num_threads(config.num_threads or default_num_threads())
    torch.manual_seed(config.seed)  # every rank's sampler draws the same numbers
    tensor_parallel = parallel_config.tensor_parallel_size > 1
    path = resolve_model_path(config.model)
    check_float_checkpoint(path)
    model_config, state = load_state(path)
    if tensor_parallel:
        check_tensor_parallel(model_config, parallel_config.world_size)
    else:
        check_pipeline_parallel(model_config, parallel_config.world_size)
    group = create_gloo_group(init_method, rank, parallel_config.world_size, parallel_config.worker_timeout_s)
    dtype, policy = getattr(torch, config.dtype), config.kernel_policy()
    if tensor_parallel:
        model, local_config = build_tensor_parallel_model(model_config, state, dtype, policy, group)
    else:
        model, local_config = build_pipeline_stage(model_config, state, dtype, policy, rank, group.world_size)
    del state
    spec = KVCacheSpec.for_model(local_config, dtype, config.kv_cache_dtype, config.block_size,
                                 grouped=not config.disable_hybrid_kv_cache_manager)  # this rank's
    config = config.replace(num_kv_blocks=agreed_num_blocks(config, spec.bytes_per_block(), group))
    engine = LLMEngine(config, model, local_config, Tokenizer.from_path(path), config.model or "SmolLM2-135M-Instruct")
    if not tensor_parallel:  # the stage's runner takes over the engine's (and its KV caches) before any step
        engine.runner = PipelineModelRunner.adopt(engine.runner, group, num_micro_batches=group.world_size)
    return RankEngine(engine, model_config, group)


def step_fingerprint(outputs: list) -> list[tuple]:
    """What two ranks' step outputs must agree on: each request's token ids and whether it finished."""
    return [(o.request_id, o.finished, tuple(tuple(c.token_ids) for c in o.outputs)) for o in outputs]


class ModelParallelWorker(EngineWorker):
    """An `EngineWorker` whose engine is built in `start`, after the front end knows where rank 0 listens.

    Rank 0 returns its whole step results; the other ranks return only `step_fingerprint`s, which the front
    end compares with rank 0's (ranks that drifted apart are a bug that must not pass silently).

    Args:
        build: `build_rank_engine` (or a test's stand-in with its signature).
        args: (engine config, parallel config, rank).
    """

    def __init__(self, build: Callable[..., RankEngine], *args: Any) -> None:
        self._build = build
        self._args = args
        self.rank = args[2]
        self.rank_engine: RankEngine | None = None
        self.engine = None

    def free_address(self) -> tuple[str, int]:
        return free_address()

    def start(self, init_method: str) -> WorkerInfo:
        self.rank_engine = self._build(*self._args, init_method)
        self.engine = self.rank_engine.engine
        return self.describe()

    def describe(self) -> WorkerInfo:
        """As `EngineWorker.describe`, with the full model's config rather than this rank's shard of it."""
        engine = self.engine
        return WorkerInfo(os.getpid(), engine.model_name, self.rank_engine.model_config, engine.config,
                          engine.eos_token_id)

    def step(self) -> StepResult | list[tuple]:
        result = super().step()
        return result if self.rank == 0 else step_fingerprint(result.outputs)

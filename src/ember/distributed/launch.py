"""Builds the engine a `ParallelConfig` asks for: one in this process, or a front end over workers."""

from __future__ import annotations

import dataclasses

from ember.config import EngineConfig
from ember.distributed.config import ParallelConfig

PARALLEL_FIELDS = frozenset(f.name for f in dataclasses.fields(ParallelConfig))


def split_parallel_kwargs(kwargs: dict) -> tuple[dict, ParallelConfig]:
    """Separate `ParallelConfig` fields from the rest (what `LLM(...)` takes in one flat call)."""
    parallel = {k: kwargs.pop(k) for k in list(kwargs) if k in PARALLEL_FIELDS}
    return kwargs, ParallelConfig(**parallel)


def create_engine(config: EngineConfig, parallel_config: ParallelConfig):
    """An `LLMEngine`, or the distributed front end of the mode `parallel_config` selects (same surface)."""
    if parallel_config.data_parallel_size > 1:
        from ember.distributed.dp_engine import DataParallelEngine

        return DataParallelEngine(config, parallel_config)
    if parallel_config.pd_disaggregation:
        from ember.distributed.pd_engine import create_pd_engine

        return create_pd_engine(config, parallel_config)
    if parallel_config.world_size > 1:
        from ember.distributed.parallel.engine import create_model_parallel_engine

        return create_model_parallel_engine(config, parallel_config)
    from ember.engine.llm_engine import LLMEngine

    return LLMEngine.from_config(config)

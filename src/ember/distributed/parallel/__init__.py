"""Tensor and pipeline parallel: one engine's model split over ranks that join a gloo group (see
docs/distributed.md). `create_model_parallel_engine` is the entry point; it is imported lazily here so
importing the package does not import torch.distributed."""


def create_model_parallel_engine(engine_config, parallel_config):
    """The tensor or pipeline parallel engine `parallel_config` asks for (see `engine.ModelParallelEngine`)."""
    from ember.distributed.parallel.engine import create_model_parallel_engine as create

    return create(engine_config, parallel_config)

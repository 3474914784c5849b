"""Turning logits into tokens: per-step sampling metadata and the vectorized sampler."""

from ember.sampling.metadata import SamplingMetadata
from ember.sampling.sampler import Sampler, SamplerOutput

__all__ = ["Sampler", "SamplerOutput", "SamplingMetadata"]

"""Ember: a CPU-first LLM inference engine and quantization workbench."""

from ember.kernels.onednn import bound_primitive_caches

bound_primitive_caches()  # before anything in the process creates a oneDNN primitive

from ember.outputs import BeamSearchOutput, BeamSearchSequence, CompletionOutput, RequestOutput
from ember.lora.request import LoRARequest
from ember.sampling_params import BeamSearchParams, SamplingParams, StructuredOutputsParams


def __getattr__(name):
    # The engine pulls in torch and transformers: import it only when asked for.
    if name == "LLM":
        from ember.entrypoints.llm import LLM
        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput",
           "BeamSearchParams", "BeamSearchOutput", "BeamSearchSequence", "LoRARequest"]

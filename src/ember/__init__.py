"""Ember: a CPU-first LLM inference engine and quantization workbench."""

"""Benchmarks behind `ember bench`: `serve` loads an OpenAI-compatible server and reports vLLM's latency metrics."""

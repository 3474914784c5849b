"""`ember bench serve`: load an OpenAI-compatible server and report vLLM-compatible latency metrics."""

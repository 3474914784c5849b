"""Scale-out: engine replicas, prefill/decode workers and model-parallel ranks in worker processes
(Ray actors or local processes), each driven from one front end that looks like an `LLMEngine`."""

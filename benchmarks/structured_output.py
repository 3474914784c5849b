"""W2 (one stream: W1's first prompt cut to 128 tokens, 128 greedy new tokens) with and without a JSON-schema
constraint, alternating, plus the compile time of each test schema.

Prints one JSON object: TTFT and TPOT per run and their medians, how many of the constrained run's tokens the
grammar masked, and cold compile / cache-hit times per schema.

    .venv/bin/python benchmarks/structured_output.py --dtype float32 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "server"))
import workloads as wl  # noqa: E402
from json_schemas import SCHEMAS  # noqa: E402

# Open-ended, so all 128 tokens stay inside the grammar: a list of records.
W2_SCHEMA = {"type": "array", "items": {"type": "object", "properties": {
    "name": {"type": "string"}, "score": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "score", "tags"]}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each setting, alternating")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


def stream(engine, request: wl.BenchRequest, constrained: bool, tag: str) -> tuple[dict, list[int]]:
    """One W2 request stepped through the engine: its stream metrics and all its output token ids."""
    from ember import SamplingParams, StructuredOutputsParams

    so = StructuredOutputsParams(json=W2_SCHEMA) if constrained else None
    params = SamplingParams(temperature=0.0, max_tokens=request.max_tokens, ignore_eos=True, structured_outputs=so)
    start = time.perf_counter()
    engine.add_request(tag, list(request.prompt_token_ids), params)
    first_token, token_ids = None, []
    while engine.has_unfinished_requests():
        for output in engine.step():
            token_ids = list(output.outputs[0].token_ids)
            if first_token is None and token_ids:
                first_token = time.perf_counter()
    return wl.stream_metrics(start, first_token, time.perf_counter(), len(token_ids)), token_ids


def num_masked(engine, token_ids: list[int]) -> int:
    """How many leading tokens a fresh matcher accepts before the grammar terminates: the masked ones."""
    from ember import StructuredOutputsParams

    manager = engine.structured_output
    matcher = manager.backend.matcher(manager.compile(StructuredOutputsParams(json=W2_SCHEMA)).result())
    for count, token in enumerate(token_ids):
        if matcher.is_terminated() or not matcher.accept_token(token):
            return count
    return len(token_ids)


def compile_times(engine) -> dict:
    """Cold compile of each schema on a fresh manager (the vocabulary already read), then a cache hit."""
    from ember import StructuredOutputsParams
    from ember.structured_output.manager import StructuredOutputManager

    manager = StructuredOutputManager(engine.tokenizer.hf, engine.model_config.vocab_size)
    manager.compile(StructuredOutputsParams(regex="warm")).result()  # reads the vocabulary once
    cold, hit = [], []
    for _, schema in SCHEMAS + [("w2", W2_SCHEMA)]:
        params = StructuredOutputsParams(json=schema)
        start = time.perf_counter()
        manager.compile(params).result()
        cold.append((time.perf_counter() - start) * 1e3)
        start = time.perf_counter()
        manager.compile(params).result()
        hit.append((time.perf_counter() - start) * 1e3)
    manager.shutdown()
    return {"num_schemas": len(cold), "cold_ms": [round(v, 2) for v in cold],
            "cold_ms_median": round(statistics.median(cold), 2), "cold_ms_max": round(max(cold), 2),
            "cache_hit_ms_median": round(statistics.median(hit), 4)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    import torch
    from ember import LLM

    llm = LLM(dtype=args.dtype, max_model_len=512, num_threads=args.threads, enable_prefix_caching=False)
    engine = llm.engine
    request = wl.build_w2()
    warm = wl.build_warmup()[0]
    stream(engine, warm, False, "warm-plain")
    stream(engine, warm, True, "warm-json")
    runs: dict[str, list[dict]] = {"plain": [], "json": []}
    masked = []
    for i in range(args.repeat):
        for name in ("plain", "json"):
            metrics, token_ids = stream(engine, request, name == "json", f"{name}-{i}")
            runs[name].append(metrics)
            if name == "json":
                masked.append(num_masked(engine, token_ids))
    result = {"engine": "ember", "dtype": args.dtype, "threads": torch.get_num_threads(),
              "num_prompt_tokens": len(request.prompt_token_ids), "max_tokens": request.max_tokens}
    for name, items in runs.items():
        result[name] = {"tpot_ms": [r["tpot_ms"] for r in items], "ttft_ms": [r["ttft_ms"] for r in items],
                        "tpot_ms_median": statistics.median(r["tpot_ms"] for r in items),
                        "ttft_ms_median": statistics.median(r["ttft_ms"] for r in items)}
    result["json"]["num_masked_tokens"] = masked
    result["json_over_plain_tpot"] = round(result["json"]["tpot_ms_median"] / result["plain"]["tpot_ms_median"], 4)
    result["compile"] = compile_times(engine)
    wl.emit(result, args.json_out)


if __name__ == "__main__":
    main()

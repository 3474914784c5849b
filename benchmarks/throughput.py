"""Run workloads W1 (offline throughput), W2 (single stream), a 512-token prefill and a long stream on ember.

Prints one JSON object: total and output tokens/s, elapsed, TTFT, TPOT, achieved weight GB/s
in decode, peak RSS, dtype, threads and the command-line options. Warms up once before timing.

    .venv/bin/python benchmarks/throughput.py --workload all --dtype bfloat16
    .venv/bin/python benchmarks/throughput.py --workload long --max-model-len 4224 --kv-cache-dtype int8
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as wl  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: the bundled model)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="run W1 this many times and report the median run "
                             "(with --prefix-caching later runs hit the cache)")
    parser.add_argument("--kv-cache-dtype", default=None, help="auto, int8 or int8-static (ember's flag)")
    parser.add_argument("--disable-kernels", default=None, help="ember's flag: linear kernels never to use")
    parser.add_argument("--speculative-config", default=None, help="ember's flag: speculative decoding as JSON")
    wl.add_workload_args(parser)
    return parser.parse_args(argv)


def engine_kwargs(args: argparse.Namespace) -> dict:
    """`LLM(...)` keyword arguments for the flags that were given and that the engine knows."""
    wanted = {"dtype": args.dtype, "max_model_len": args.max_model_len,
              "max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": args.max_num_batched_tokens,
              "kv_cache_memory_gib": args.kv_cache_gib, "enable_prefix_caching": args.prefix_caching,
              "num_threads": args.threads, "kv_cache_dtype": args.kv_cache_dtype,
              "disable_kernels": args.disable_kernels, "speculative_config": args.speculative_config}
    wanted = {key: value for key, value in wanted.items() if value is not None}
    try:
        from ember.config import EngineConfig
    except ImportError:  # an engine without a config module takes the vLLM-style core arguments
        return {k: wanted[k] for k in ("dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens")
                if k in wanted}
    known = {f.name for f in dataclasses.fields(EngineConfig)}
    return {key: value for key, value in wanted.items() if key in known}


def _params(max_tokens: int):
    from ember import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_offline(llm, requests: list[wl.BenchRequest]) -> dict:
    return wl.run_offline(llm, requests, _params)


def run_stream(llm, request: wl.BenchRequest, request_id: str) -> dict:
    """One request: stepped through the engine when it exposes `add_request`/`step`, so the first
    and last tokens are timed as they come out; otherwise from `generate`'s request metrics."""
    engine = getattr(llm, "engine", None)
    if engine is None or not hasattr(engine, "step"):
        return _stream_from_metrics(llm, request)
    return wl.run_stepped(engine, lambda: engine.add_request(
        request_id, list(request.prompt_token_ids), _params(request.max_tokens)))


def _stream_from_metrics(llm, request: wl.BenchRequest) -> dict:
    (output,) = llm.generate([{"prompt_token_ids": request.prompt_token_ids}], [_params(request.max_tokens)],
                             use_tqdm=False)
    m = output.metrics
    token_ids = list(output.outputs[0].token_ids)
    metrics = wl.stream_metrics(m.arrival_time, m.first_token_time, m.finished_time, len(token_ids))
    metrics["first_token_ids"] = token_ids[:8]
    return metrics


def weight_bytes(llm) -> int | None:
    """Bytes of the model's parameters and buffers, for the decode bandwidth figure."""
    engine = getattr(llm, "engine", None)
    model = getattr(getattr(engine, "runner", None), "model", None) or getattr(engine, "model", None)
    if model is None or not hasattr(model, "parameters"):
        return None
    # tied weights once (the LM head's weight is a view of the embedding's storage)
    tensors = {t.untyped_storage().data_ptr(): t for t in list(model.parameters()) + list(model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def run(args: argparse.Namespace) -> dict:
    """Load ember, warm up once, run the selected workloads; returns the JSON-ready result."""
    import torch
    from ember import LLM

    kwargs = engine_kwargs(args)
    start = time.perf_counter()
    llm = LLM(model=args.model, **kwargs)
    load_s = time.perf_counter() - start
    parts = wl.selected(args.workload)
    if not args.no_warmup:
        run_offline(llm, wl.build_warmup())
        run_stream(llm, wl.build_warmup()[0], "warmup-stream")
    result: dict = {"engine": "ember", "model": args.model or "bundled SmolLM2-135M-Instruct (GGUF)",
                    "dtype": args.dtype, "threads": torch.get_num_threads(), "load_s": round(load_s, 2),
                    "engine_kwargs": kwargs, "args": vars(args)}
    if "w1" in parts:
        runs = [run_offline(llm, wl.build_w1(num_requests=args.num_requests)) for _ in range(max(1, args.repeat))]
        result["w1"] = sorted(runs, key=lambda run: run["total_tok_s"])[(len(runs) - 1) // 2]  # the median run
        if len(runs) > 1:
            result["w1"]["runs_total_tok_s"] = [run["total_tok_s"] for run in runs]
    if "w2" in parts:
        result["w2"] = run_stream(llm, wl.build_w2(), "w2")
        num_bytes = weight_bytes(llm)
        if num_bytes and result["w2"]["tpot_ms"] > 0:
            result["w2"]["weight_gb_s"] = round(num_bytes / (result["w2"]["tpot_ms"] * 1e-3) / 1e9, 2)
    if "prefill" in parts:
        prefill = run_stream(llm, wl.build_prefill(), "prefill")
        result["prefill"] = {"num_prompt_tokens": wl.PREFILL_LEN, "ttft_ms": prefill["ttft_ms"]}
    if "long" in parts:
        request = wl.build_long()
        needed = len(request.prompt_token_ids) + request.max_tokens
        if args.max_model_len < needed:
            raise SystemExit(f"--workload long needs --max-model-len >= {needed}")
        result["long"] = {"num_prompt_tokens": len(request.prompt_token_ids), **run_stream(llm, request, "long")}
    result["peak_rss_mib"] = wl.peak_rss_mib()
    return result


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wl.emit(run(args), args.json_out)


if __name__ == "__main__":
    main()

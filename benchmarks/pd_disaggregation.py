"""Prefill/decode disaggregation under interference: `--num-streams` ongoing greedy streams while
`--prompt-len`-token prompts arrive every `--interval` s; the streams' inter-token latency (ITL) with P/D
(1 prefill + 1 decode worker on Ray, one thread each) against one colocated engine with both threads, on
the same cores. Prints one JSON object per mode.

    .venv/bin/python benchmarks/pd_disaggregation.py --mode both --cpus 0,1 --duration 60

ITL is measured where a caller sees tokens: the gap between consecutive tokens of a stream as `step`
returns them, for gaps that end inside the arrival window. Long prompts are distinct (no prefix reuse);
their TTFT counts from their scheduled arrival, so a backlog shows up there.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as wl  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=("pd", "colocated", "both"), default="both")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of long-prompt arrivals")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between long prompts")
    parser.add_argument("--prompt-len", type=int, default=2048, help="tokens of each long prompt")
    parser.add_argument("--long-max-tokens", type=int, default=16, help="new tokens of each long prompt")
    parser.add_argument("--num-streams", type=int, default=8)
    parser.add_argument("--stream-prompt-len", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2,
                        help="threads in all: the colocated engine's, split evenly over the P/D workers")
    parser.add_argument("--cpus", default=None, help="pin this process and its children, e.g. 0,1")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine default when unset")
    parser.add_argument("--kv-cache-gib", type=float, default=1.0, help="KV cache of each engine")
    parser.add_argument("--drain-s", type=float, default=60.0, help="most seconds to wait for the last long prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


def random_ids(rng: random.Random, length: int) -> list[int]:
    return [rng.randint(*wl.TOKEN_ID_RANGE) for _ in range(length)]


def build_engine(mode: str, args: argparse.Namespace):
    """(engine, close): an in-process `LLMEngine` with every thread, or a `PDEngine` with 1 + 1 workers."""
    from ember.config import EngineConfig

    common = dict(dtype=args.dtype, kv_cache_memory_gib=args.kv_cache_gib,
                  max_num_batched_tokens=args.max_num_batched_tokens, seed=args.seed)
    if mode == "colocated":
        from ember.engine.llm_engine import LLMEngine

        return LLMEngine.from_config(EngineConfig(num_threads=args.threads, **common)), lambda: None
    from ember.distributed.config import ParallelConfig
    from ember.distributed.pd_engine import create_pd_engine
    from ember.distributed.ray_env import init_ray

    ray = init_ray(num_cpus=args.threads)
    engine = create_pd_engine(EngineConfig(num_threads=max(1, args.threads // 2), **common),
                              ParallelConfig(pd_disaggregation=True, num_prefill_workers=1, num_decode_workers=1))

    def close() -> None:
        engine.shutdown()
        ray.shutdown()
    return engine, close


def drain(engine) -> None:
    while engine.has_unfinished_requests():
        engine.step()


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def run_workload(engine, args: argparse.Namespace) -> dict:
    """The streams and the arrivals, stepped from this thread; ITL and TTFT as the caller sees them."""
    from ember.sampling_params import SamplingParams

    rng = random.Random(args.seed)
    stream_tokens = min(4096, engine.config.max_model_len - args.stream_prompt_len)
    stream_params = SamplingParams(temperature=0.0, max_tokens=stream_tokens, ignore_eos=True)
    long_params = SamplingParams(temperature=0.0, max_tokens=args.long_max_tokens, ignore_eos=True)
    seen: dict[str, tuple[int, float]] = {}  # stream id -> (tokens seen, time of the latest)
    gaps: list[float] = []
    arrivals: dict[str, float] = {}  # long prompt id -> scheduled arrival
    ttfts: dict[str, float] = {}
    finished_long: set[str] = set()
    start = time.monotonic()
    end = start + args.duration
    for i in range(args.num_streams):
        engine.add_request(f"s{i}", random_ids(rng, args.stream_prompt_len), stream_params)
    num_long = 0
    while True:
        now = time.monotonic()
        while start + (num_long + 1) * args.interval <= min(now, end):
            num_long += 1
            request_id, due = f"long{num_long}", start + num_long * args.interval
            engine.add_request(request_id, random_ids(rng, args.prompt_len), long_params, arrival_time=due)
            arrivals[request_id] = due
        if now >= end and (len(finished_long) == num_long or now >= end + args.drain_s):
            break
        outputs = engine.step()
        now = time.monotonic()
        for output in outputs:
            count = len(output.outputs[0].token_ids)
            if output.request_id in arrivals:
                if count and output.request_id not in ttfts:
                    ttfts[output.request_id] = now - arrivals[output.request_id]
                if output.finished:
                    finished_long.add(output.request_id)
                continue
            previous = seen.get(output.request_id)
            if previous is not None and count > previous[0] and now <= end:
                gaps.append(now - previous[1])  # one token per step (no speculation here)
            seen[output.request_id] = (count, now)
    engine.abort_request([f"s{i}" for i in range(args.num_streams)] + list(arrivals))
    drain(engine)
    ms = [g * 1e3 for g in gaps]
    waits = list(ttfts.values())
    streams = {"num_gaps": len(ms), "itl_ms_p50": _round(percentile(ms, 50)), "itl_ms_p99": _round(percentile(ms, 99)),
               "itl_ms_mean": _round(statistics.fmean(ms) if ms else None), "itl_ms_max": _round(max(ms, default=None)),
               "tokens_per_s": round(len(ms) / args.duration, 2)}
    long_prompts = {"arrived": num_long, "first_token": len(ttfts), "finished": len(finished_long),
                    "ttft_s_p50": _round(percentile(waits, 50), 3), "ttft_s_max": _round(max(waits, default=None), 3)}
    return {"streams": streams, "long_prompts": long_prompts}


def _round(value: float | None, digits: int = 1) -> float | None:
    return None if value is None else round(value, digits)


def run_mode(mode: str, args: argparse.Namespace) -> dict:
    engine, close = build_engine(mode, args)
    try:
        from ember.sampling_params import SamplingParams

        # Warm up once on the workload's shapes (a long prompt and the streams), from another seed so no
        # prefix of the timed prompts is cached.
        warm, params = random.Random(wl.WARMUP_SEED), SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
        engine.add_request("warmup-long", random_ids(warm, args.prompt_len), params)
        for i in range(args.num_streams):
            engine.add_request(f"warmup-{i}", random_ids(warm, args.stream_prompt_len), params)
        drain(engine)
        result = {"mode": mode, **run_workload(engine, args)}
        stats = engine.get_stats()
        if mode == "pd":
            pool = engine.pool_stats()
            result["kv_transfer"] = {"bytes": stats.kv_transfer_bytes, "seconds": round(stats.kv_transfer_seconds, 3),
                                     "pool_blocks": pool.num_blocks, "pool_hit_blocks": pool.num_hit_blocks}
        result["num_preemptions"] = stats.num_preemptions_total
        result["driver_peak_rss_mib"] = wl.peak_rss_mib()
        return result
    finally:
        close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.cpus:
        os.sched_setaffinity(0, {int(c) for c in args.cpus.split(",")})  # Ray's processes inherit it
    modes = ["colocated", "pd"] if args.mode == "both" else [args.mode]
    names = ("dtype", "duration", "interval", "prompt_len", "long_max_tokens", "num_streams", "stream_prompt_len",
             "threads", "max_num_batched_tokens", "seed")
    setup = {name: getattr(args, name) for name in names}
    setup["cpus"] = sorted(os.sched_getaffinity(0))
    wl.emit({"setup": setup, "results": [run_mode(mode, args) for mode in modes]}, args.json_out)


if __name__ == "__main__":
    main()

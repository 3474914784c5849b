"""Data parallel on Ray: prefix-aware routing against round robin, and a replica killed mid-run.

`routing`: 8 system prompts x 8 users (a 256-token system prompt, a 32-token user turn, 32 greedy tokens),
arriving in a shuffled order as a Poisson stream, on two replicas with one thread each; each policy runs
in alternation (`--repeat`), and the JSON gives the prefix-cache hit rate over prompt tokens and the mean
and p90 TTFT (arrival to first token) of each.
`kill`: 64 W1-drawn requests (32-96 prompt tokens, 32 new tokens) on two replicas; replica 0 is killed
after `--kill-after-steps` steps; the JSON counts requests completed, retried and failed, the longest
request, and when the replica was back.

    .venv/bin/python benchmarks/data_parallel.py --experiment routing --repeat 2
    .venv/bin/python benchmarks/data_parallel.py --experiment kill
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from ember.config import EngineConfig
from ember.distributed.config import ParallelConfig
from ember.distributed.dp_engine import DataParallelEngine
from ember.sampling_params import SamplingParams

TOKEN_RANGE = (100, 49052)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", choices=["routing", "kill"], required=True)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--backend", default="ray", choices=["ray", "mp"])
    parser.add_argument("--repeat", type=int, default=1, help="routing: runs per policy, alternating")
    parser.add_argument("--rate", type=float, default=4.0, help="routing: arrivals per second")
    parser.add_argument("--kill-after-steps", type=int, default=20)
    return parser.parse_args(argv)


def routing_requests(seed: int = 0):
    """(arrival offset s, prompt ids) for 8 system prompts x 8 users, users shuffled, Poisson arrivals."""
    rng = random.Random(seed)
    systems = [[rng.randint(*TOKEN_RANGE) for _ in range(256)] for _ in range(8)]
    prompts = [systems[s] + [rng.randint(*TOKEN_RANGE) for _ in range(32)] for s in range(8) for _ in range(8)]
    rng.shuffle(prompts)
    return prompts, rng


def run_stream(engine, prompts, rate: float, rng: random.Random, max_tokens: int = 32) -> dict:
    """Feed `prompts` at Poisson arrivals of `rate`/s, step until all finish; TTFT per request."""
    arrivals, t = [], 0.0
    for _ in prompts:
        t += rng.expovariate(rate)
        arrivals.append(t)
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.monotonic()
    arrived_at, first, nxt = {}, {}, 0
    while nxt < len(prompts) or engine.has_unfinished_requests():
        now = time.monotonic() - start
        while nxt < len(prompts) and arrivals[nxt] <= now:
            engine.add_request(str(nxt), prompts[nxt], params)
            arrived_at[str(nxt)] = start + arrivals[nxt]
            nxt += 1
        if not engine.has_unfinished_requests():
            time.sleep(min(0.01, max(0.0, arrivals[nxt] - now)))
            continue
        for output in engine.step():
            if output.request_id not in first and output.outputs[0].token_ids:
                first[output.request_id] = time.monotonic()
    ttft = sorted(first[r] - arrived_at[r] for r in arrived_at)
    return {"ttft_mean_ms": 1000 * statistics.mean(ttft), "ttft_p90_ms": 1000 * ttft[int(0.9 * len(ttft))],
            "wall_s": time.monotonic() - start}


def routing(args) -> dict:
    config = EngineConfig(dtype=args.dtype, max_model_len=1024, num_kv_blocks=512)
    results = {"round_robin": [], "prefix": []}
    for _ in range(args.repeat):
        for policy in results:
            engine = DataParallelEngine(config, ParallelConfig(data_parallel_size=2, routing_policy=policy,
                                                               distributed_executor_backend=args.backend))
            try:
                prompts, rng = routing_requests()
                run_stream(engine, prompts[:2], 100.0, random.Random(9), 2)  # warm-up, distinct prompts
                before = engine.get_stats()
                figures = run_stream(engine, prompts, args.rate, rng)
                after = engine.get_stats()
                queries = after.prefix_cache_queries - before.prefix_cache_queries
                hits = after.prefix_cache_hits - before.prefix_cache_hits
                figures["prefix_cache_hit_rate"] = hits / queries
                results[policy].append(figures)
            finally:
                engine.shutdown()
    return {policy: {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            for policy, runs in results.items()}


def kill(args) -> dict:
    config = EngineConfig(dtype=args.dtype, max_model_len=512, num_kv_blocks=512)
    engine = DataParallelEngine(config, ParallelConfig(data_parallel_size=2, distributed_executor_backend=args.backend,
                                                       worker_timeout_s=60))
    try:
        rng = random.Random(0)
        params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True)
        start = time.monotonic()
        for i in range(64):
            engine.add_request(str(i), [rng.randint(*TOKEN_RANGE) for _ in range(rng.randint(32, 96))], params)
        finished, steps, killed_at, back_at = {}, 0, None, None
        while engine.has_unfinished_requests() or back_at is None:
            for output in engine.step():
                if output.finished:
                    finished[output.request_id] = (output, time.monotonic() - start)
            steps += 1
            if steps == args.kill_after_steps:
                engine.kill_replica(0)
                killed_at = time.monotonic() - start
            if killed_at is not None and back_at is None and engine.replica_states()["0"] == "ready" \
                    and engine.replicas[0].num_restarts:
                back_at = time.monotonic() - start
            if time.monotonic() - start > 600:
                break
        errors = [rid for rid, (o, _) in finished.items() if "error" in o.extra]
        return {"requests": 64, "finished": len(finished), "completed": len(finished) - len(errors),
                "failed_with_error": len(errors), "retried_elsewhere": engine.num_requests_retried, "error_example": finished[errors[0]][0].extra["error"] if errors else None,
                "killed_at_s": killed_at, "replica_back_at_s": back_at,
                "longest_request_s": max(t for _, t in finished.values()), "steps": steps}
    finally:
        engine.shutdown()


def main(argv=None) -> None:
    args = parse_args(argv)
    result = routing(args) if args.experiment == "routing" else kill(args)
    print(json.dumps({"experiment": args.experiment, "backend": args.backend, "dtype": args.dtype, **result},
                     indent=2))


if __name__ == "__main__":
    main()

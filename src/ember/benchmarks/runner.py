"""Send a workload at a request rate (Poisson/gamma arrivals) or fixed concurrency; sweep rates and plot."""

from __future__ import annotations

import asyncio
import math
import time

import httpx
import numpy as np

from ember.benchmarks.client import RequestResult, Target, send_request
from ember.benchmarks.datasets import SampleRequest


def arrival_gaps(num: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Seconds to wait before each request: gamma(shape=burstiness) gaps with mean 1/rate (vLLM).

    burstiness 1.0 is a Poisson process; lower is burstier, higher more regular. An infinite rate
    sends everything at once.
    """
    if math.isinf(request_rate):
        return [0.0] * num
    rng = np.random.default_rng(seed)
    theta = 1.0 / (request_rate * burstiness)
    return rng.gamma(shape=burstiness, scale=theta, size=num).tolist()


async def run_benchmark(target: Target, requests: list[SampleRequest], request_rate: float = math.inf,
                        burstiness: float = 1.0, max_concurrency: int | None = None, seed: int = 0,
                        timeout_s: float = 3600.0) -> tuple[list[RequestResult], float]:
    """Send all requests; returns their results (in dataset order) and the wall time in seconds."""
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    semaphore = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout_s), limits=limits) as client:

        async def limited(request: SampleRequest) -> RequestResult:
            if semaphore is None:
                return await send_request(client, target, request)
            async with semaphore:
                return await send_request(client, target, request)

        start = time.perf_counter()
        tasks = []
        for request, gap in zip(requests, arrival_gaps(len(requests), request_rate, burstiness, seed)):
            if gap > 0:
                await asyncio.sleep(gap)
            tasks.append(asyncio.ensure_future(limited(request)))
        results = await asyncio.gather(*tasks)
        return list(results), time.perf_counter() - start


async def warm_up(target: Target, request: SampleRequest) -> RequestResult:
    """One request before measuring, as vLLM does; a failure here means the setup is wrong."""
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
        return await send_request(client, target, request)


def plot_sweep(points: list[dict], path: str, percentiles: list[float], title: str) -> None:
    """One panel per latency metric: its percentiles against the offered request rate."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    panels = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8))
    rates = [p["request_rate"] for p in points]
    for ax, (name, label) in zip(axes, panels):
        for pct in percentiles:
            key = f"p{int(pct) if float(pct).is_integer() else pct}_{name}_ms"
            ax.plot(rates, [p[key] for p in points], marker="o", label=f"p{key.split('_')[0][1:]}")
        ax.set_title(label)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("ms")
        ax.grid(True, alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

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


async def warm_up(target: Target, requests: list[SampleRequest], num_requests: int,
                  max_concurrency: int | None = None) -> list[RequestResult]:
    """Send `num_requests` workload requests (cycled) at once, up to `max_concurrency`, before measuring.

    The first requests on a fresh server pay for lazy set-up (kernel builds and dispatch, allocator
    growth, the first batch shapes), so the first measured point would look slower than it is. Their
    results only say whether the setup works; no metric counts them.
    """
    if num_requests <= 0 or not requests:
        return []
    batch = [requests[i % len(requests)] for i in range(num_requests)]
    results, _ = await run_benchmark(target, batch, math.inf, 1.0, max_concurrency, timeout_s=600.0)
    return results


def sweep_figure(points: list[dict], percentiles: list[float], title: str, subtitle: str = ""):
    """One panel per latency metric: its percentiles against the offered request rate; `subtitle` (what
    was measured: model, dataset, lengths, date, commit) goes under the title. Returns the figure."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    panels = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E latency"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2))
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
    fig.suptitle(title, y=0.99)
    if subtitle:
        fig.text(0.5, 0.915, subtitle, ha="center", va="top", fontsize=9, color="0.3")
    fig.tight_layout(rect=(0, 0, 1, 0.9 if subtitle else 0.95))
    return fig


def plot_sweep(points: list[dict], path: str, percentiles: list[float], title: str, subtitle: str = "") -> None:
    """Write `sweep_figure` to `path` (PNG)."""
    import matplotlib.pyplot as plt

    fig = sweep_figure(points, percentiles, title, subtitle)
    fig.savefig(path, dpi=110)
    plt.close(fig)

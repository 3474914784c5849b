"""Aggregate request timings into vLLM's serving-benchmark metrics (names and definitions kept)."""

from __future__ import annotations

import numpy as np

from ember.benchmarks.client import RequestResult

METRICS = ("ttft", "tpot", "itl", "e2el")
METRIC_TITLES = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
                 "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}


def parse_goodput(specs: list[str] | None) -> dict[str, float]:
    """`["ttft:500", "tpot:50"]` -> SLOs in ms; raises ValueError on unknown metrics or bad values."""
    slos = {}
    for spec in specs or []:
        name, _, value = spec.partition(":")
        if name not in ("ttft", "tpot", "e2el"):
            raise ValueError(f"goodput metric must be ttft, tpot or e2el, got {name!r}")
        slos[name] = float(value)
        if not slos[name] > 0:
            raise ValueError(f"goodput SLO for {name} must be positive, got {value!r}")
    return slos


def _tpot(r: RequestResult) -> float | None:
    return (r.latency - r.ttft) / (r.output_len - 1) if r.output_len > 1 else None


def calculate_metrics(results: list[RequestResult], duration_s: float, percentiles: list[float],
                      goodput_slos: dict[str, float] | None = None) -> dict:
    """vLLM's result dict: counts, throughputs, and mean/median/std/pXX per latency metric in ms."""
    ok = [r for r in results if r.success]
    total_input = sum(r.prompt_len for r in ok)
    total_output = sum(r.output_len for r in ok)
    values = {
        "ttft": [r.ttft for r in ok],
        "tpot": [t for t in (_tpot(r) for r in ok) if t is not None],
        "itl": [gap for r in ok for gap in r.itl],
        "e2el": [r.latency for r in ok],
    }
    good = 0
    for r in ok:
        measured = {"ttft": r.ttft, "tpot": _tpot(r) or 0.0, "e2el": r.latency}
        if all(measured[k] * 1000 <= slo for k, slo in (goodput_slos or {}).items()):
            good += 1
    out = {
        "duration": duration_s,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": total_input,
        "total_output_tokens": total_output,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": good / duration_s if goodput_slos else None,
        "output_throughput": total_output / duration_s,
        "total_token_throughput": (total_input + total_output) / duration_s,
        "errors": sorted({r.error for r in results if r.error})[:10],
    }
    for name, series in values.items():
        ms = np.asarray(series or [0.0]) * 1000
        out[f"mean_{name}_ms"] = float(ms.mean())
        out[f"median_{name}_ms"] = float(np.median(ms))
        out[f"std_{name}_ms"] = float(ms.std())
        for p in percentiles:
            out[f"p{_pct_name(p)}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def _pct_name(p: float) -> str:
    return str(int(p)) if float(p).is_integer() else str(p)


def format_report(m: dict, percentiles: list[float], title: str = "Serving Benchmark Result") -> str:
    """The table vLLM's `bench serve` prints."""
    lines = [f"{' ' + title + ' ':=^50}"]

    def row(label: str, value, fmt: str = "{:<10.2f}") -> None:
        lines.append(f"{label:<40}" + (fmt.format(value) if value is not None else "n/a"))

    row("Successful requests:", m["completed"], "{:<10}")
    row("Failed requests:", m["failed"], "{:<10}")
    row("Benchmark duration (s):", m["duration"])
    row("Total input tokens:", m["total_input_tokens"], "{:<10}")
    row("Total generated tokens:", m["total_output_tokens"], "{:<10}")
    row("Request throughput (req/s):", m["request_throughput"])
    if m.get("request_goodput") is not None:
        row("Request goodput (req/s):", m["request_goodput"])
    row("Output token throughput (tok/s):", m["output_throughput"])
    row("Total Token throughput (tok/s):", m["total_token_throughput"])
    for name in METRICS:
        lines.append(f"{' ' + METRIC_TITLES[name] + ' ':-^50}")
        row(f"Mean {name.upper()} (ms):", m[f"mean_{name}_ms"])
        row(f"Median {name.upper()} (ms):", m[f"median_{name}_ms"])
        for p in percentiles:
            row(f"P{_pct_name(p)} {name.upper()} (ms):", m[f"p{_pct_name(p)}_{name}_ms"])
    lines.append("=" * 50)
    return "\n".join(lines)

"""`ember bench`: the command-line entry to the benchmarks in `ember.benchmarks`."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bench` with its `serve` subcommand."""
    from ember.benchmarks.serve import add_cli_args, main

    bench = subparsers.add_parser("bench", help="benchmarks against a running server")
    sub = bench.add_subparsers(dest="bench_command", required=True)
    p = sub.add_parser("serve", help="online serving benchmark: TTFT, TPOT, ITL, E2E latency, throughput",
                       description="Send a workload to `ember serve` (or any OpenAI-compatible server) "
                                   "and report vLLM's serving metrics; --sweep-request-rates plots them.")
    add_cli_args(p)
    p.set_defaults(func=main)
    return p

"""`ember sim pages`: the page-size simulator of `ember.kv_cache.page_simulator`, as a table,
JSON and a plot."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from ember.config import add_config_cli_args, config_from_cli_args
from ember.kv_cache.page_simulator import PageSimConfig, PageSimResult, run_page_sim

_COLUMNS = (("page", "page_size", "{}"), ("fragmentation %", "fragmentation", "{:.3f}"),
            ("expected %", "expected_fragmentation", "{:.3f}"), ("peak blocks", "peak_blocks", "{}"),
            ("peak slots", "peak_slots", "{}"), ("allocator ops", "num_allocator_ops", "{}"),
            ("ops/s", "allocator_ops_per_s", "{:,.0f}"))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add `sim` with its `pages` subcommand."""
    sim = subparsers.add_parser("sim", help="offline simulations of engine components")
    sub = sim.add_subparsers(dest="sim_command", required=True)
    pages = sub.add_parser(
        "pages", help="KV page size: fragmentation, peak blocks and allocator speed",
        description="Monte-Carlo allocate/free of sampled sequence lengths through the real block "
                    "allocator, one run per page size on the same lengths.")
    add_config_cli_args(pages, PageSimConfig)
    pages.add_argument("--json", action="store_true", help="print JSON instead of the table")
    pages.add_argument("--plot", default=None, metavar="FILE.png",
                       help="write fragmentation and peak blocks against page size")
    pages.set_defaults(func=cmd_pages)


def cmd_pages(args: argparse.Namespace) -> None:
    config = config_from_cli_args(args, PageSimConfig)
    start = time.monotonic()
    results = run_page_sim(config)
    elapsed_s = time.monotonic() - start
    if args.plot:
        plot_results(results, args.plot, describe(config))
    if args.json:
        print(json.dumps({"config": dataclasses.asdict(config), "elapsed_s": round(elapsed_s, 1),
                          "results": [dataclasses.asdict(r) for r in results]}, indent=1))
        return
    print(f"{describe(config)}, {elapsed_s:.1f} s")
    print(format_table(results))


def describe(config: PageSimConfig) -> str:
    source = f"trace {config.trace}" if config.trace else f"{config.num_seqs} x {config.lengths}"
    return (f"{source} cut at {config.max_len}, {config.concurrency} concurrent, "
            f"growth {config.growth}, seed {config.seed}")


def format_table(results: list[PageSimResult]) -> str:
    """A Markdown table, one row per page size; fractions shown as percent."""
    rows = []
    for r in results:
        values = dataclasses.asdict(r)
        for key in ("fragmentation", "expected_fragmentation"):
            values[key] *= 100
        rows.append([fmt.format(values[key]) for _, key, fmt in _COLUMNS])
    header = [title for title, _, _ in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def plot_results(results: list[PageSimResult], path: str, title: str) -> None:
    """Two panels against page size: fragmentation % (measured, expected), peak blocks."""
    import matplotlib
    matplotlib.use("Agg")  # files only; no display on servers
    import matplotlib.pyplot as plt

    sizes = [r.page_size for r in results]
    fig, (frag_ax, peak_ax) = plt.subplots(1, 2, figsize=(9, 3.6))
    frag_ax.plot(sizes, [100 * r.fragmentation for r in results], marker="o", label="measured")
    frag_ax.plot(sizes, [100 * r.expected_fragmentation for r in results], linestyle="--",
                 label="expected")
    frag_ax.set_ylabel("internal fragmentation (%)")
    frag_ax.legend()
    peak_ax.plot(sizes, [r.peak_blocks for r in results], marker="o", color="tab:red")
    peak_ax.set_ylabel("peak blocks in use")
    for ax in (frag_ax, peak_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlabel("page size (tokens per block)")
        ax.grid(True, alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

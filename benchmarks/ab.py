"""W1 and W2 on two ember models in one process, run in alternation, with the ratio of each round.

Separate processes one after another drift by 5-10% on a shared 2-core machine, which hides
differences of that size. Here both engines are loaded side by side; one round runs A, then B (W1,
then W2 each), the next B, then A, so both see the same machine state. Prints one JSON object: each
round's figures, the per-round ratios B / A (> 1: B is faster) and their medians.

    .venv/bin/python benchmarks/ab.py --model-b CHECKPOINT_DIR --rounds 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import throughput as tp  # noqa: E402
import workloads as wl  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-a", default=None, help="GGUF file or model directory (default: the bundled model)")
    parser.add_argument("--model-b", required=True, help="GGUF file or model directory")
    parser.add_argument("--rounds", type=int, default=5, help="A/B rounds after one warm-up of each")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="KV cache memory per engine in GiB")
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


def one_round(llm) -> dict:
    w1 = tp.run_offline(llm, wl.build_w1())
    w2 = tp.run_stream(llm, wl.build_w2(), "w2")
    return {"w1_total_tok_s": w1["total_tok_s"], "w2_tpot_ms": w2["tpot_ms"], "w2_ttft_ms": w2["ttft_ms"]}


def run(args: argparse.Namespace) -> dict:
    import torch
    from ember import LLM

    kwargs = {"max_model_len": wl.MAX_MODEL_LEN, "kv_cache_memory_gib": args.kv_cache_gib,
              "enable_prefix_caching": False}
    engines = {"a": LLM(model=args.model_a, **kwargs), "b": LLM(model=args.model_b, **kwargs)}
    for llm in engines.values():
        tp.run_offline(llm, wl.build_warmup())
        tp.run_stream(llm, wl.build_warmup()[0], "warmup-stream")
        tp.run_offline(llm, wl.build_w1())  # first W1 of a process is slow (new shapes, first-touch pages)
    rounds = []
    for i in range(args.rounds):  # A first in even rounds, B first in odd ones
        order = ("a", "b") if i % 2 == 0 else ("b", "a")
        rounds.append({name: one_round(engines[name]) for name in order})
    w1_ratio = [r["b"]["w1_total_tok_s"] / r["a"]["w1_total_tok_s"] for r in rounds]
    w2_ratio = [r["a"]["w2_tpot_ms"] / r["b"]["w2_tpot_ms"] for r in rounds]
    return {"model_a": args.model_a or "bundled SmolLM2-135M-Instruct (GGUF)", "model_b": args.model_b,
            "threads": torch.get_num_threads(), "rounds": rounds,
            "w1_speedup_b_over_a": [round(v, 3) for v in w1_ratio],
            "w2_speedup_b_over_a": [round(v, 3) for v in w2_ratio],
            "median_w1_speedup": round(statistics.median(w1_ratio), 3),
            "median_w2_speedup": round(statistics.median(w2_ratio), 3),
            "peak_rss_mib": wl.peak_rss_mib()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    wl.emit(run(args), args.json_out)


if __name__ == "__main__":
    main()

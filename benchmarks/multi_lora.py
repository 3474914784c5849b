"""W1 throughput with LoRA: the base model alone against the same batch spread over several adapters.

Three engines, timed in alternation on W1: `base` (no LoRA), `lora-base` (LoRA enabled, every request on
the base) and `lora-spread` (request i on adapter i mod N, the base model never). Adapters are PEFT
directories (`--adapters`), or N random rank-8 adapters on q/k/v/o and gate/up/down made here with `peft`.
Prints one JSON object with each engine's median run and the ratios to `base`.

    .venv/bin/python benchmarks/multi_lora.py --dtype float32 --num-adapters 4 --repeat 2
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as wl  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapters", nargs="+", default=None, help="PEFT adapter directories")
    parser.add_argument("--num-adapters", type=int, default=4, help="random adapters to make without --adapters")
    parser.add_argument("--rank", type=int, default=8, help="rank of the random adapters")
    parser.add_argument("--repeat", type=int, default=1, help="timed W1 runs per engine (alternating)")
    wl.add_workload_args(parser)
    return parser.parse_args(argv)


def make_random_adapters(count: int, rank: int, folder: str) -> list[str]:
    """`count` PEFT adapters of the bundled model with random A and B, saved under `folder`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from ember.loader.model_loader import default_model_path

    directory, name = os.path.split(default_model_path())
    base = AutoModelForCausalLM.from_pretrained(directory, gguf_file=name, dtype=torch.float32)
    paths = []
    for i in range(count):
        torch.manual_seed(i)
        model = get_peft_model(copy.deepcopy(base), LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS,
                                                init_lora_weights=False))
        paths.append(os.path.join(folder, f"adapter-{i}"))
        model.save_pretrained(paths[-1])
    return paths


def build_engines(args: argparse.Namespace, num_adapters: int, max_rank: int) -> dict:
    from ember import LLM

    common = {"dtype": args.dtype, "max_model_len": args.max_model_len, "kv_cache_memory_gib": args.kv_cache_gib,
              "enable_prefix_caching": args.prefix_caching, "num_threads": args.threads or wl.default_threads()}
    lora = {"enable_lora": True, "max_loras": num_adapters, "max_lora_rank": max_rank}
    return {"base": LLM(**common), "lora": LLM(**common, **lora)}


def run(llm, requests: list[wl.BenchRequest], loras: list | None) -> dict:
    import time

    from ember import SamplingParams

    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r.max_tokens, ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=loras)
    elapsed = time.perf_counter() - start
    return wl.throughput_metrics(requests, [len(o.outputs[0].token_ids) for o in outputs], elapsed)


def main(argv: list[str] | None = None) -> None:
    from ember import LoRARequest
    from ember.lora.adapter import load_peft_adapter

    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        paths = args.adapters or make_random_adapters(args.num_adapters, args.rank, folder)
        adapters = [LoRARequest(f"adapter-{i}", i + 1, path) for i, path in enumerate(paths)]
        max_rank = max(load_peft_adapter(path, "probe").rank for path in paths)
        engines = build_engines(args, len(adapters), max_rank)
        requests = wl.build_w1(num_requests=args.num_requests)
        spread = [adapters[i % len(adapters)] for i in range(len(requests))]
        modes = {"base": (engines["base"], None), "lora-base": (engines["lora"], None),
                 "lora-spread": (engines["lora"], spread)}
        if not args.no_warmup:
            for llm, loras in modes.values():
                warm = wl.build_warmup()
                run(llm, warm, loras[:len(warm)] if loras else None)
        runs: dict[str, list[dict]] = {mode: [] for mode in modes}
        for _ in range(args.repeat):
            for mode, (llm, loras) in modes.items():
                runs[mode].append(run(llm, requests, loras))
    result = {mode: _median(results) for mode, results in runs.items()}
    base = result["base"]["total_tok_s"]
    result.update({
        "ratio_lora_base": result["lora-base"]["total_tok_s"] / base,
        "ratio_lora_spread": result["lora-spread"]["total_tok_s"] / base,
        "num_adapters": len(adapters), "max_lora_rank": max_rank, "dtype": args.dtype,
        "threads": args.threads or wl.default_threads(), "num_requests": len(requests), "repeat": args.repeat,
        "peak_rss_mib": wl.peak_rss_mib(),
    })
    wl.emit(result, args.json_out)


def _median(results: list[dict]) -> dict:
    ordered = sorted(results, key=lambda r: r["total_tok_s"])
    return {**ordered[len(ordered) // 2], "runs_total_tokens_per_s": [r["total_tok_s"] for r in results],
            "spread_pct": 100 * (max(r["total_tok_s"] for r in results) /
                                 statistics.median(r["total_tok_s"] for r in results) - 1)}


if __name__ == "__main__":
    main()

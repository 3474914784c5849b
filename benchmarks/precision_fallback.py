"""Precision fallback: greedy agreement with the unquantized model, and the cost of one request in fallback.

`--mode agreement`: 32 prompts of 128 tokens from the evaluation plays (King Lear + Julius Caesar, at
evenly spaced offsets), 64 greedy tokens each, in float32. Each `--model LABEL=DIR[:fallback]` is
compared with the bundled unquantized model: the share of the 64 positions where it emits the same
token, and the mean length of the common prefix; `:fallback` turns on `precision_fallback`.

`--mode step`: two engines on the checkpoint, each with the same 16 requests decoding together (prompts of
128 tokens from W1); in the second one request is switched to its high-precision copies. Their decode
steps alternate, one of each at a time, so the machine's drift between processes and over minutes hits
both alike: the mean and median of `--steps` steps each, and the ratios. Prints one JSON object.

    .venv/bin/python benchmarks/precision_fallback.py --mode agreement --model int4=ckpt/int4 --model mix=ckpt/mix \
        --model mix+fallback=ckpt/mix:fallback
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as wl  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["agreement", "step"], required=True)
    parser.add_argument("--model", action="append", default=[], help="LABEL=DIR[:fallback] (agreement), DIR (step)")
    parser.add_argument("--num-prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--fallback-kl", type=float, default=0.02)
    parser.add_argument("--fallback-skew", type=float, default=3.0)
    parser.add_argument("--batch", type=int, default=16, help="step mode: requests decoding together")
    parser.add_argument("--steps", type=int, default=32, help="step mode: timed decode steps per phase")
    parser.add_argument("--num-threads", type=int, default=None)
    return parser.parse_args(argv)


def evaluation_prompts(num_prompts: int, prompt_len: int) -> list[list[int]]:
    from ember.eval.datasets import EVALUATION_PLAYS, play_paths, read_texts
    from ember.loader.model_loader import resolve_model_path
    from ember.loader.tokenizer import Tokenizer

    ids = Tokenizer.from_path(resolve_model_path(None)).encode(read_texts(play_paths(EVALUATION_PLAYS)),
                                                               add_special_tokens=False)
    stride = (len(ids) - prompt_len) // num_prompts
    return [ids[i * stride:i * stride + prompt_len] for i in range(num_prompts)]


def greedy(model: str | None, prompts, args, fallback: bool = False) -> tuple[list[list[int]], list]:
    from ember import LLM, SamplingParams

    kwargs = dict(precision_fallback=True, fallback_kl=args.fallback_kl, fallback_skew=args.fallback_skew) \
        if fallback else {}
    llm = LLM(model=model, dtype=args.dtype, num_threads=args.num_threads, **kwargs)
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outputs], outputs


def agreement(args: argparse.Namespace) -> dict:
    prompts = evaluation_prompts(args.num_prompts, args.prompt_len)
    reference, _ = greedy(None, prompts, args)
    rows = []
    for spec in args.model:
        label, _, target = spec.partition("=")
        directory, _, flag = target.partition(":")
        tokens, outputs = greedy(directory, prompts, args, fallback=flag == "fallback")
        same = [sum(a == b for a, b in zip(ours, ref)) for ours, ref in zip(tokens, reference)]
        prefix = [next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), len(ref))
                  for ours, ref in zip(tokens, reference)]
        switches = [o.precision_switch_token for o in outputs if getattr(o, "precision_switch_token", None) is not None]
        rows.append({"label": label, "model": directory, "fallback": flag == "fallback",
                     "agreement": sum(same) / sum(len(r) for r in reference),
                     "mean_common_prefix": sum(prefix) / len(prefix), "num_fallbacks": len(switches),
                     "fallback_tokens": switches})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return {"mode": "agreement", "dtype": args.dtype, "num_prompts": args.num_prompts,
            "prompt_len": args.prompt_len, "max_tokens": args.max_tokens, "rows": rows}


def step_cost(args: argparse.Namespace) -> dict:
    import statistics

    from ember.config import EngineConfig, UsageContext
    from ember.engine.llm_engine import LLMEngine
    from ember.sampling_params import SamplingParams

    config = EngineConfig(model=args.model[0] if args.model else None, dtype=args.dtype, num_threads=args.num_threads,
                          usage_context=UsageContext.OFFLINE, enable_prefix_caching=False)
    prompts = [r.prompt_token_ids[:args.prompt_len] for r in wl.build_w1(num_requests=args.batch)]
    params = SamplingParams(temperature=0.0, max_tokens=args.steps + 16, ignore_eos=True)
    engines = []
    for fallback in (False, True):
        engine = LLMEngine.from_config(config)
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", prompt, params)
        while engine.get_stats().num_waiting or any(r.num_output_tokens == 0 for r in engine.scheduler.running):
            engine.step()  # prefill every prompt (W1's prompts are all longer than 128 tokens)
        if fallback:
            engine.set_request_precision("r0", "bf16")
        for _ in range(4):
            engine.step()  # warm up the decode shapes (and the switch step)
        engines.append(engine)
    times: list[list[float]] = [[], []]
    for _ in range(args.steps):
        for engine, record in zip(engines, times):
            start = time.perf_counter()
            engine.step()
            record.append(1000 * (time.perf_counter() - start))
    quantized, fallback = times
    mean, median = statistics.mean, statistics.median
    return {"mode": "step", "model": config.model, "dtype": args.dtype, "batch": args.batch, "steps": args.steps,
            "quantized_step_ms": mean(quantized), "one_fallback_step_ms": mean(fallback),
            "ratio": mean(fallback) / mean(quantized),
            "quantized_step_median_ms": median(quantized), "one_fallback_step_median_ms": median(fallback),
            "median_ratio": median(fallback) / median(quantized)}


def main() -> None:
    args = parse_args()
    result = agreement(args) if args.mode == "agreement" else step_cost(args)
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

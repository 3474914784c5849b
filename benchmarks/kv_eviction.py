"""KV eviction on long inputs: perplexity of an evaluation document, and passkey retrieval.

`--mode ppl`: the first `--num-tokens` tokens of King Lear (an evaluation play), teacher-forced in
chunks of `--chunk` tokens through the paged cache (`eval/long_context.py`), evicting after each chunk
as the engine does after each step. Policies: full (no eviction), streaming, h2o, snapkv and recent
(streaming without sinks), each with `--budget` rows.

`--mode passkey`: a five-digit number hidden at `--depths` of `--lengths` tokens of filler, then "What is
the pass key? The pass key is"; 8 greedy tokens through `LLM.generate` with each policy; found = the
number appears in the output.

    .venv/bin/python benchmarks/kv_eviction.py --mode ppl --num-tokens 8192 --budget 1024
    .venv/bin/python benchmarks/kv_eviction.py --mode passkey --lengths 2048,4096,8000 --depths 0.1,0.5,0.9
"""
from __future__ import annotations

import argparse
import json
import random
import time

POLICIES = {"full": ("none", 4), "streaming": ("streaming", 4), "h2o": ("h2o", 4), "snapkv": ("snapkv", 4),
            "recent": ("streaming", 0)}
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["ppl", "passkey"], required=True)
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--budget", type=int, default=1024, help="KV rows kept per request")
    parser.add_argument("--num-tokens", type=int, default=8192, help="ppl: document length")
    parser.add_argument("--chunk", type=int, default=32, help="ppl: tokens per teacher-forced chunk")
    parser.add_argument("--lengths", default="2048,4096,8000", help="passkey: prompt lengths in tokens")
    parser.add_argument("--depths", default="0.1,0.5,0.9", help="passkey: where the key sits (fraction of the filler)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--num-threads", type=int, default=None)
    return parser.parse_args(argv)


def eviction_config(name: str, budget: int, block_size: int = 16):
    from ember.attention.eviction import EvictionConfig

    policy, sinks = POLICIES[name]
    return None if policy == "none" else EvictionConfig(policy, budget, sinks, block_size)


def run_ppl(args: argparse.Namespace) -> list[dict]:
    import torch

    from ember.eval.datasets import play_paths, read_texts
    from ember.eval.long_context import long_context_perplexity
    from ember.loader.model_loader import load_model, resolve_model_path
    from ember.loader.tokenizer import Tokenizer

    path = resolve_model_path(None)
    ids = Tokenizer.from_path(path).encode(read_texts(play_paths(["lear_gut.txt"])), add_special_tokens=False)
    ids = ids[:args.num_tokens]
    model, _ = load_model(path, getattr(torch, args.dtype))
    rows = []
    for name in args.policies.split(","):
        start = time.monotonic()
        result = long_context_perplexity(model, ids, eviction_config(name, args.budget), args.chunk)
        rows.append({"policy": name, "budget": None if name == "full" else args.budget, **result.to_dict(),
                     "elapsed_s": round(time.monotonic() - start, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def passkey_prompt(tokenizer, length: int, depth: float, key: int) -> list[int]:
    """INTRO + filler with the key sentence at `depth` + the question, about `length` tokens."""
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    question = "What is the pass key? The pass key is"
    per_filler = len(tokenizer.encode(FILLER * 100, add_special_tokens=False)) / 100  # merges across repeats
    budget = length - len(tokenizer.encode(INTRO + needle + question, add_special_tokens=False))
    repeats = max(int(budget // per_filler), 1)
    before = round(repeats * depth)
    text = INTRO + FILLER * before + needle + FILLER * (repeats - before) + question
    return tokenizer.encode(text, add_special_tokens=False)


def run_passkey(args: argparse.Namespace) -> list[dict]:
    from ember import LLM, SamplingParams
    from ember.loader.model_loader import resolve_model_path
    from ember.loader.tokenizer import Tokenizer

    rng = random.Random(args.seed)
    tokenizer = Tokenizer.from_path(resolve_model_path(None))
    cases = [(passkey_prompt(tokenizer, int(n), float(d), key), d, key) for n in args.lengths.split(",")
             for d in args.depths.split(",") for key in [rng.randint(10000, 99999)]]
    params = SamplingParams(temperature=0, max_tokens=8)
    max_len = max(len(prompt) for prompt, _, _ in cases) + params.max_tokens
    rows = []
    for name in args.policies.split(","):
        policy, sinks = POLICIES[name]
        eviction = {} if policy == "none" else {"kv_eviction": policy, "kv_budget_tokens": args.budget,
                                                "kv_sink_tokens": sinks}
        llm = LLM(dtype=args.dtype, max_model_len=max_len, num_kv_blocks=-(-max_len // 16) + 8,
                  num_threads=args.num_threads, **eviction)
        for prompt, depth, key in cases:
            start = time.monotonic()
            text = llm.generate({"prompt_token_ids": prompt}, params, use_tqdm=False)[0].outputs[0].text
            rows.append({"policy": name, "length": len(prompt), "depth": float(depth), "key": key,
                         "found": str(key) in text, "output": text, "elapsed_s": round(time.monotonic() - start, 1)})
            print(json.dumps(rows[-1]), flush=True)
        del llm
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.num_threads and args.mode == "ppl":
        import torch

        torch.set_num_threads(args.num_threads)
    rows = run_ppl(args) if args.mode == "ppl" else run_passkey(args)
    print(json.dumps({"mode": args.mode, "budget": args.budget, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()

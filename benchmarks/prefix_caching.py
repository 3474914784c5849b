"""Prefix-caching benchmark: shared system prompt TTFT (cold vs warm) and a multi-turn chat replay.

Prints one JSON object. Usage:
    python benchmarks/prefix_caching.py [--dtype bfloat16] [--no-enable-prefix-caching]
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

from ember import LLM, SamplingParams

SYSTEM_LEN = 1024
QUESTION_LEN = 32
NUM_REQUESTS = 16


def shared_prompt_ttft(llm: LLM, seed: int = 0) -> dict:
    """16 requests = one 1024-token system prompt + a distinct 32-token question, sent one by one."""
    rng = random.Random(seed)
    system = [rng.randint(100, 49052) for _ in range(SYSTEM_LEN)]
    params = SamplingParams(temperature=0, max_tokens=1, ignore_eos=True)
    ttfts, cached = [], []
    for _ in range(NUM_REQUESTS):
        question = [rng.randint(100, 49052) for _ in range(QUESTION_LEN)]
        out = llm.generate({"prompt_token_ids": system + question}, params, use_tqdm=False)[0]
        ttfts.append((out.metrics.first_token_time - out.metrics.arrival_time) * 1e3)
        cached.append(out.num_cached_tokens)
    warm = statistics.median(ttfts[1:])
    return {"cold_ttft_ms": round(ttfts[0], 1), "warm_ttft_ms_median": round(warm, 1),
            "cold_over_warm": round(ttfts[0] / warm, 2), "cached_tokens": cached}


def chat_replay(llm: LLM, num_turns: int = 6) -> list[dict]:
    """Each turn resends the whole conversation; only the new tokens should be computed."""
    tokenizer = llm.get_tokenizer()
    messages = [{"role": "system", "content": "You are a concise assistant who answers in one sentence."}]
    questions = ["What is a river?", "Where do rivers end?", "Name a long one.", "How long is it?",
                 "Which countries does it cross?", "Thank you. Summarize our talk."]
    params = SamplingParams(temperature=0, max_tokens=48)
    turns = []
    previous: list[int] = []  # last turn's prompt + generated tokens, i.e. what the cache saw
    for question in questions[:num_turns]:
        messages.append({"role": "user", "content": question})
        prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(messages), add_special_tokens=False)
        start = time.monotonic()
        out = llm.generate({"prompt_token_ids": prompt_ids}, params, use_tqdm=False)[0]
        answer = out.outputs[0].text
        messages.append({"role": "assistant", "content": answer})
        shared = next((i for i, (a, b) in enumerate(zip(prompt_ids, previous)) if a != b),
                      min(len(prompt_ids), len(previous)))
        previous = prompt_ids + out.outputs[0].token_ids
        turns.append({"prompt_tokens": len(prompt_ids), "new_tokens": len(prompt_ids) - shared,
                      "cached_tokens": out.num_cached_tokens,
                      "computed_prefill_tokens": len(prompt_ids) - out.num_cached_tokens,
                      "ttft_ms": round((out.metrics.first_token_time - out.metrics.arrival_time) * 1e3, 1),
                      "latency_s": round(time.monotonic() - start, 3)})
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--enable-prefix-caching", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--num-threads", type=int, default=None)
    args = parser.parse_args()
    llm = LLM(dtype=args.dtype, max_model_len=2048, enable_prefix_caching=args.enable_prefix_caching,
              num_threads=args.num_threads)
    llm.generate({"prompt_token_ids": list(range(1000, 1100))}, SamplingParams(max_tokens=2), use_tqdm=False)
    result = {"dtype": args.dtype, "enable_prefix_caching": args.enable_prefix_caching,
              "shared_system_prompt": shared_prompt_ttft(llm), "chat_replay": chat_replay(llm),
              "prefix_cache_hit_rate": round(llm.get_stats().prefix_cache_hit_rate, 3)}
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()

"""Perplexity of the bundled SmolLM2-135M-Instruct with and without a LoRA adapter on the evaluation plays.

Scores, in float32 with `transformers`, the base model, the base model wrapped with the PEFT adapter, and
the adapter merged into the weights (`merge_and_unload()`), on King Lear + Julius Caesar (the evaluation
plays, disjoint from the calibration plays the adapter was trained on). Perplexity is Ember's own
definition, computed by `ember.eval.perplexity.perplexity` itself (each play tokenized without special
tokens, first `--max-tokens` tokens, windows of 512 every 256 tokens, each token scored once); the
plays' NLLs are summed as `ember eval perplexity` does. `--check-ember` also scores Ember's float32
engine model, which should agree with the `transformers` base model. Prints one JSON object.

    .venv/bin/python examples/lora_perplexity.py --adapter adapters/shakespeare-r8 --num-threads 2
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_shakespeare_lora import load_base_model  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--adapter", default="adapters/shakespeare-r8", help="PEFT adapter directory")
    parser.add_argument("--window", type=int, default=512, help="tokens per window (as `ember eval perplexity`)")
    parser.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    parser.add_argument("--max-tokens", type=int, default=4096,
                        help="score the first this many tokens of each play (0: the whole play)")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--check-ember", action="store_true", help="also score Ember's float32 model")
    return parser.parse_args(argv)


class TransformersAsEmber:
    """A `transformers` causal LM behind the two calls `ember.eval.perplexity.window_logits` makes.

    `window_logits` runs one fresh sequence from position 0 (no `chunk_size`), so the paged cache and
    attention metadata it passes can be ignored: the whole window goes through the model at once.
    """

    def __init__(self, hf_model) -> None:
        self.hf_model = hf_model

    def __call__(self, input_ids, positions, caches, meta) -> torch.Tensor:
        return self.hf_model(input_ids=input_ids[None], use_cache=False).logits[0]  # [num_tokens, vocab]

    @staticmethod
    def compute_logits(logits: torch.Tensor) -> torch.Tensor:
        return logits.float()

    @staticmethod
    def scratch_caches() -> list:
        """Stand-in for the per-layer caches: `window_logits` reads only their block size."""
        return [SimpleNamespace(block_size=16)]


def evaluation_token_ids(tokenizer) -> dict[str, list[int]]:
    from ember.eval.datasets import EVALUATION_PLAYS, play_paths

    ids = {}
    for name, path in zip(EVALUATION_PLAYS, play_paths(EVALUATION_PLAYS)):
        with open(path, encoding="utf-8", errors="replace") as f:
            ids[name] = tokenizer.encode(f.read(), add_special_tokens=False)
    return ids


def score(model, caches, play_ids: dict[str, list[int]], args: argparse.Namespace) -> dict:
    """Perplexity over all plays (NLLs summed, as `ember eval perplexity`) and per play."""
    from ember.eval.perplexity import perplexity

    start, nll, count, plays = time.monotonic(), 0.0, 0, {}
    for name, ids in play_ids.items():
        result = perplexity(model, ids, args.window, args.stride, args.max_tokens or None, caches)
        nll, count = nll + result.nll_sum, count + result.num_tokens
        plays[name] = {"perplexity": result.perplexity, "num_tokens": result.num_tokens}
    result = {"perplexity": math.exp(nll / count), "num_tokens": count, "plays": plays,
              "elapsed_s": round(time.monotonic() - start, 1)}
    print(f"perplexity {result['perplexity']:.4f} on {count} tokens ({result['elapsed_s']}s)", file=sys.stderr)
    return result


def score_hf(hf_model, play_ids: dict[str, list[int]], args: argparse.Namespace) -> dict:
    hf_model.eval()
    return score(TransformersAsEmber(hf_model), TransformersAsEmber.scratch_caches(), play_ids, args)


def score_ember(play_ids: dict[str, list[int]], args: argparse.Namespace) -> dict:
    from ember.loader.model_loader import load_model, resolve_model_path

    model, _ = load_model(resolve_model_path(None), torch.float32)
    return score(model, None, play_ids, args)


def main(argv: list[str] | None = None) -> None:
    from peft import PeftModel

    args = parse_args(argv)
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    base, tokenizer = load_base_model(torch.float32)
    play_ids = evaluation_token_ids(tokenizer)
    results = {"base": score_hf(base, play_ids, args)}
    adapted = PeftModel.from_pretrained(base, args.adapter)  # wraps `base` in place
    results["peft"] = score_hf(adapted, play_ids, args)
    results["merged"] = score_hf(adapted.merge_and_unload(), play_ids, args)
    if args.check_ember:
        results["ember_base"] = score_ember(play_ids, args)
    relative = results["peft"]["perplexity"] / results["base"]["perplexity"] - 1.0
    print(json.dumps({"adapter_dir": args.adapter, "dtype": "float32", "window": args.window, "stride": args.stride,
                      "max_tokens_per_play": args.max_tokens or None, "num_threads": torch.get_num_threads(),
                      "peft_vs_base_pct": round(100 * relative, 2), **results}, indent=1))


if __name__ == "__main__":
    main()

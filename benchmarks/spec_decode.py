"""Speculative decoding on W3 (copying text: where drafts pay) and W2 (random tokens: where they should not
cost), with speculation off and with each configured method, alternating runs in one process.

W3: 8 chat requests "Repeat the following text exactly:" + a ~200-word passage of King Lear, greedy,
128 new tokens (EOS ignored), timed one at a time (TTFT, TPOT) and as one batch of 8 (output tok/s).
Prints one JSON object: per setting and run the metrics, their medians, and the speculation counters
(acceptance rate, per position, mean acceptance length) of the setting's engine.

    .venv/bin/python benchmarks/spec_decode.py --dtype float32 --repeat 3
    .venv/bin/python benchmarks/spec_decode.py --dtype float32 --draft-model ckpt-w4a8 --methods off,draft_model
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as wl  # noqa: E402

W3_NUM_PASSAGES = 8
W3_PASSAGE_WORDS = 200
W3_OUTPUT_LEN = 128
W3_PLAY = "lear_gut.txt"
W3_INSTRUCTION = "Repeat the following text exactly:"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="bfloat16", help="bfloat16 or float32")
    parser.add_argument("--methods", default="off,ngram", help="comma-separated: off, ngram, draft_model, suffix")
    parser.add_argument("--num-speculative-tokens", type=int, default=None,
                        help="default: 4, and for suffix its tree depth (24), as vLLM")
    parser.add_argument("--draft-model", default=None, help="draft_model: the draft checkpoint")
    parser.add_argument("--suffix-max-cached-requests", type=int, default=None,
                        help="suffix: finished requests the global tree keeps (default vLLM's 10000; 0: none, so "
                             "a repeated run cannot draft from the outputs of the run before)")
    parser.add_argument("--draft-budget", default=None,
                        help='goodput (ember\'s default: the drafts that pay, measured as it runs) or max (every '
                             'proposal whole, as vLLM)')
    parser.add_argument("--workloads", default="w3,w3-batch,w2", help="comma-separated: w3, w3-batch, w2")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each setting, alternating")
    parser.add_argument("--num-passages", type=int, default=W3_NUM_PASSAGES, help="W3 single-stream requests")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--disable-kernels", default=None, help="ember's flag: linear kernels never to use")
    parser.add_argument("--json-out", default=None)
    return parser.parse_args(argv)


def w3_passages() -> list[str]:
    """8 passages of ~200 words (whole lines), evenly spaced through the play after its cast list."""
    from ember.eval.datasets import play_paths, read_texts

    lines = [line.rstrip() for line in read_texts(play_paths((W3_PLAY,))).splitlines()]
    lines = lines[len(lines) // 20:]  # past the title and the persons represented
    passages, step = [], len(lines) // W3_NUM_PASSAGES
    for i in range(W3_NUM_PASSAGES):
        chosen, words = [], 0
        for line in lines[i * step:]:
            if words >= W3_PASSAGE_WORDS:
                break
            chosen.append(line)
            words += len(line.split())
        passages.append("\n".join(chosen).strip())
    return passages


def w3_requests(tokenizer) -> list[wl.BenchRequest]:
    requests = []
    for passage in w3_passages():
        text = tokenizer.apply_chat_template([{"role": "user", "content": f"{W3_INSTRUCTION}\n\n{passage}"}])
        requests.append(wl.BenchRequest(tokenizer.encode(text, add_special_tokens=False), W3_OUTPUT_LEN))
    return requests


def make_llm(args, method: str):
    from ember import LLM

    spec = None
    if method != "off":
        spec = {"method": method, "num_speculative_tokens": args.num_speculative_tokens}
        if method == "draft_model":
            spec["model"] = args.draft_model
        if method == "suffix" and args.suffix_max_cached_requests is not None:
            spec["suffix_decoding_max_cached_requests"] = args.suffix_max_cached_requests
        if args.draft_budget is not None:
            spec["draft_budget"] = args.draft_budget
    return LLM(dtype=args.dtype, max_model_len=wl.MAX_MODEL_LEN, num_threads=args.threads,
               enable_prefix_caching=False, speculative_config=spec, disable_kernels=args.disable_kernels)


def params(max_tokens: int):
    from ember import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def single_streams(llm, requests: list[wl.BenchRequest], tag: str) -> dict:
    """Each request alone, stepped: median TTFT and TPOT over the requests, and their output tokens."""
    engine = llm.engine
    ttfts, tpots, outputs = [], [], []
    for i, request in enumerate(requests):
        metrics = wl.run_stepped(engine, lambda: engine.add_request(f"{tag}-{i}", request.prompt_token_ids,
                                                                     params(request.max_tokens)))
        ttfts.append(metrics["ttft_ms"])
        tpots.append(metrics["tpot_ms"])
        outputs.append(metrics["first_token_ids"])
    return {"ttft_ms": round(statistics.median(ttfts), 2), "tpot_ms": round(statistics.median(tpots), 3),
            "tpot_ms_per_request": tpots, "first_token_ids": outputs}


def spec_counters(llm):
    """The engine's `SpecDecodingStats` totals (None without speculation)."""
    return llm.engine.get_stats().spec_decoding


def counter_delta(before, after) -> dict | None:
    """Acceptance over one run: the counters' difference, as `SpecDecodingStats.as_dict` reports them."""
    if before is None:
        return None
    from ember.spec_decode.speculator import SpecDecodingStats

    return SpecDecodingStats(after.num_drafts - before.num_drafts, after.num_draft_tokens - before.num_draft_tokens,
                             after.num_accepted_tokens - before.num_accepted_tokens,
                             [a - b for a, b in zip(after.accepted_per_position, before.accepted_per_position)]).as_dict()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    methods = args.methods.split(",")
    workloads = args.workloads.split(",")
    llms = {method: make_llm(args, method) for method in methods}
    tokenizer = next(iter(llms.values())).engine.tokenizer
    w3 = w3_requests(tokenizer)
    w2 = wl.build_w2()
    for method, llm in llms.items():  # warm-up: kernels, allocator, the draft model's first pass
        wl.run_offline(llm, wl.build_warmup()[:2], params)
    runs: dict[str, dict[str, list]] = {m: {w: [] for w in workloads} for m in methods}
    for repeat in range(args.repeat):
        for method in methods if repeat % 2 == 0 else reversed(methods):
            llm = llms[method]
            for workload in workloads:
                before = spec_counters(llm)
                if workload == "w3":
                    result = single_streams(llm, w3[:args.num_passages], f"w3-{repeat}")
                elif workload == "w3-batch":
                    result = wl.run_offline(llm, w3, params)
                else:
                    result = single_streams(llm, [w2], f"w2-{repeat}")
                result["spec_decoding"] = counter_delta(before, spec_counters(llm))
                runs[method][workload].append(result)
                print(f"# {method} {workload} run {repeat}: "
                      f"{ {k: v for k, v in result.items() if k in ('tpot_ms', 'output_tok_s', 'ttft_ms')} }",
                      file=sys.stderr, flush=True)
    summary = {}
    for method in methods:
        summary[method] = {}
        for workload, results in runs[method].items():
            key = "output_tok_s" if workload == "w3-batch" else "tpot_ms"
            summary[method][workload] = {f"median_{key}": statistics.median(r[key] for r in results)}
            if results[0]["spec_decoding"] is not None:  # acceptance over all runs of this workload
                total = {k: sum(r["spec_decoding"][k] for r in results)
                         for k in ("num_drafts", "num_draft_tokens", "num_accepted_tokens")}
                summary[method][workload]["acceptance_rate"] = round(
                    total["num_accepted_tokens"] / max(1, total["num_draft_tokens"]), 3)
                summary[method][workload]["mean_acceptance_length"] = round(
                    1 + total["num_accepted_tokens"] / max(1, total["num_drafts"]), 3)
    base = summary.get("off", {})
    for method in methods:
        if method == "off" or not base:
            continue
        speedup = {}
        for workload in workloads:
            if workload == "w3-batch":
                speedup[workload] = round(summary[method][workload]["median_output_tok_s"]
                                          / base[workload]["median_output_tok_s"], 3)
            else:
                speedup[workload] = round(base[workload]["median_tpot_ms"] / summary[method][workload]["median_tpot_ms"], 3)
        summary[method]["speedup_vs_off"] = speedup
    same_tokens = all(runs[m]["w3"][0]["first_token_ids"] == runs[methods[0]]["w3"][0]["first_token_ids"]
                      for m in methods) if "w3" in workloads else None
    wl.emit({"benchmark": "spec_decode", "dtype": args.dtype, "threads": args.threads or wl.default_threads(),
             "disable_kernels": args.disable_kernels,
             "num_speculative_tokens": args.num_speculative_tokens, "draft_budget": args.draft_budget,
             "draft_model": args.draft_model,
             "w3_prompt_tokens": [len(r.prompt_token_ids) for r in w3], "same_first_tokens": same_tokens,
             "summary": summary, "runs": runs, "when": time.strftime("%Y-%m-%d %H:%M:%S")}, args.json_out)


if __name__ == "__main__":
    main()

"""Where an engine step's time goes: matmuls, decode attention, other layer ops, the engine.

A decode step is timed as served (`native_step_ms`: the native decode loop where it applies), then through
the layer modules, with the linears returning cached outputs, then also with the decode attention returning
its query, then with the whole model replaced: the differences are the matmuls, the attention and the other
layer ops; what remains is the engine (scheduling, inputs, sampling, detokenizing). `--workload w1` instead
steps W1 and sums the steps with and without prefill.
Prints one JSON object (milliseconds for decode, seconds for w1).

    .venv/bin/python benchmarks/step_breakdown.py --workload decode --num-seqs 48 --context 310
    .venv/bin/python benchmarks/step_breakdown.py --workload w1
    .venv/bin/python benchmarks/step_breakdown.py --num-seqs 1 --context 128 --model CHECKPOINT_DIR
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time
from contextlib import ExitStack, contextmanager
from unittest import mock

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import workloads as wl  # noqa: E402


def _params(max_tokens: int):
    from ember import SamplingParams

    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def median_step_ms(engine, num_steps: int) -> float:
    times = []
    for _ in range(num_steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    return round(statistics.median(times) * 1e3, 2)


@contextmanager
def cached_linears():
    """bf16 and quantized linears return the output they computed first for each input shape."""
    from ember.kernels.linear.module import KernelLinear

    cache = {}

    def caching(real):
        def forward(self, x):
            key = (id(self), tuple(x.shape))
            if key not in cache:
                cache[key] = real(self, x)
            return cache[key]
        return forward

    with mock.patch.object(KernelLinear, "forward", caching(KernelLinear.forward)):
        yield


@contextmanager
def modules_only():
    """Decode steps through the layer modules (the stubs below patch them), not the native decode loop."""
    with mock.patch.dict(os.environ, {"EMBER_DISABLE_NATIVE_DECODE": "1"}):
        yield


@contextmanager
def no_decode_attention():
    with mock.patch("ember.attention.paged_attention._decode_attention", lambda q, *args: q.clone()):
        yield


@contextmanager
def no_model(model, hidden_size: int):
    import torch

    def forward(input_ids, positions, kv_caches, meta, precision=None):
        return torch.zeros(input_ids.shape[0], hidden_size, dtype=torch.bfloat16)

    with mock.patch.object(model, "forward", forward):
        yield


def decode_breakdown(llm, num_seqs: int, context: int, num_steps: int) -> dict:
    engine = llm.engine
    rng = random.Random(0)
    for i in range(num_seqs):
        engine.add_request(f"d{i}", [rng.randint(100, 49052) for _ in range(context)], _params(5 * num_steps + 10))
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()  # prefill everything first
    model = engine.runner.model
    engine.step()
    native_step_ms = median_step_ms(engine, num_steps)  # as served: the native decode loop where it applies
    stages = [("step_ms", [modules_only()]), ("without_matmul_ms", [modules_only(), cached_linears()]),
              ("without_matmul_attention_ms", [modules_only(), cached_linears(), no_decode_attention()]),
              ("engine_only_ms", [cached_linears(), no_model(model, model.config.hidden_size)])]
    result = {"native_step_ms": native_step_ms}
    for name, patches in stages:
        with ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            engine.step()
            result[name] = median_step_ms(engine, num_steps)
    result["matmul_ms"] = round(result["step_ms"] - result["without_matmul_ms"], 2)
    result["attention_ms"] = round(result["without_matmul_ms"] - result["without_matmul_attention_ms"], 2)
    result["other_layer_ops_ms"] = round(result["without_matmul_attention_ms"] - result["engine_only_ms"], 2)
    return result


def w1_steps(llm) -> dict:
    engine = llm.engine
    for i, request in enumerate(wl.build_w1()):
        engine.add_request(f"w1-{i}", list(request.prompt_token_ids), _params(request.max_tokens))
    real_execute, kinds = engine.runner.execute, []

    def execute(scheduler_output):
        decode_only = all(s.num_new_tokens == 1 for s in scheduler_output.scheduled)
        kinds.append("decode_only" if decode_only else "with_prefill")
        return real_execute(scheduler_output)

    totals = {"with_prefill": {"steps": 0, "seconds": 0.0}, "decode_only": {"steps": 0, "seconds": 0.0}}
    start = time.perf_counter()
    with mock.patch.object(engine.runner, "execute", execute):
        while engine.has_unfinished_requests():
            step_start = time.perf_counter()
            engine.step()
            entry = totals[kinds[-1]]
            entry["steps"] += 1
            entry["seconds"] = round(entry["seconds"] + time.perf_counter() - step_start, 3)
    return {"total_s": round(time.perf_counter() - start, 2), **totals}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=("decode", "w1"), default="decode")
    parser.add_argument("--num-seqs", type=int, default=48)
    parser.add_argument("--context", type=int, default=310)
    parser.add_argument("--num-steps", type=int, default=15)
    parser.add_argument("--model", default=None, help="GGUF file, HF or quantized checkpoint directory")
    args = parser.parse_args()
    from ember import LLM

    llm = LLM(model=args.model, max_model_len=1024, kv_cache_memory_gib=2.0, enable_prefix_caching=False)
    warmup = wl.build_warmup()
    llm.generate([{"prompt_token_ids": r.prompt_token_ids} for r in warmup], [_params(r.max_tokens) for r in warmup],
                 use_tqdm=False)
    if args.workload == "decode":
        result = decode_breakdown(llm, args.num_seqs, args.context, args.num_steps)
    else:
        result = w1_steps(llm)
    wl.emit({"workload": args.workload, "args": vars(args), **result}, None)


if __name__ == "__main__":
    main()

"""Kernel micro-benchmark: ms per call of each quantized linear kernel vs a dense bf16/fp32 linear, as JSON.

Usage: python -m ember.benchmarks.kernels [--shapes 576x576,576x1536,1536x576] [--tokens 1,2,8,32] [--threads 2]
"""
from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from ember.kernels.linear.registry import KERNEL_REGISTRY
from ember.quant.linear import QuantLinear
from ember.quant.rtn import WeightScheme, quantize_weight

SETTINGS = {  # name -> (scheme, act_bits, activation dtype, kernel)
    "int8_wo_bf16": (WeightScheme(8), None, torch.bfloat16, "int8_weight_only"),
    "int4_g64_bf16": (WeightScheme(4, 64, True), None, torch.bfloat16, "int4_weight_only"),
    "int4_g32_asym_bf16": (WeightScheme(4, 32, False), None, torch.bfloat16, "int4_weight_only"),
    "int4_g64_fp32": (WeightScheme(4, 64, True), None, torch.float32, "int4_weight_only"),
    "w8a8_fbgemm": (WeightScheme(8), 8, torch.float32, "fbgemm_w8a8"),
    "w8a8_int_mm": (WeightScheme(8), 8, torch.float32, "int_mm_w8a8"),
    "int8_wo_fp32": (WeightScheme(8), None, torch.float32, "int8_weight_only"),
    "int4_g64_dequant_dense_bf16": (WeightScheme(4, 64, True), None, torch.bfloat16, "dequant_dense"),
    "int8_dequant_dense_bf16": (WeightScheme(8), None, torch.bfloat16, "dequant_dense"),
}


def time_ms(fn, repeats: int = 7, calls: int = 10) -> float:
    """Best-of-``repeats`` mean over ``calls`` calls: the machine is shared, the minimum is the stable figure."""
    fn()  # warm up (also builds packed operands)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e3


def bench_shape(in_features: int, out_features: int, num_tokens: int) -> dict[str, float]:
    """Milliseconds per call for dense bf16/fp32 and every applicable quantized setting."""
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.02
    x = torch.randn(num_tokens, in_features, generator=gen)
    out = {"dense_fp32": time_ms(lambda: F.linear(x, weight))}
    w16, x16 = weight.bfloat16(), x.bfloat16()
    out["dense_bf16"] = time_ms(lambda: F.linear(x16, w16))
    for name, (scheme, act_bits, dtype, kernel_name) in SETTINGS.items():
        if in_features % scheme.group_len(in_features):
            continue
        layer = QuantLinear.from_quantized(quantize_weight(weight, scheme), act_bits=act_bits)
        kernel, xd = KERNEL_REGISTRY[kernel_name], x.to(dtype)
        if kernel.supports(layer.spec, dtype):
            out[name] = time_ms(lambda: layer.run_kernel(xd, kernel))
    return {k: round(v, 4) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shapes", default="576x576,576x1536,1536x576", help="KxN list (in x out)")
    parser.add_argument("--tokens", default="1,2,8,32")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for shape in args.shapes.split(","):
        k, n = (int(v) for v in shape.split("x"))
        for tokens in (int(t) for t in args.tokens.split(",")):
            results.append({"in": k, "out": n, "tokens": tokens, "ms": bench_shape(k, n, tokens)})
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()

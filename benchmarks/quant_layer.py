"""ms per decoder layer's four linears (fused qkv, o, fused gate/up, down of SmolLM2-135M) for the bf16
dense linear (the kernel the dispatch picks) and each weight-only, W8A8 and W4A8 kernel, as JSON lines.

Usage: python benchmarks/quant_layer.py [--tokens 16,64,256,1024] [--threads 2]
(EMBER_DISABLE_AMX=1 ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 in front: as a CPU without AMX runs)
"""
from __future__ import annotations

import argparse
import json

import torch
from torch import nn

from ember.benchmarks.kernels import time_ms
from ember.kernels.linear.registry import KERNEL_REGISTRY
from ember.models.layers.linear import DenseLinear
from ember.quant.linear import QuantLinear
from ember.quant.rtn import WeightScheme, quantize_weight

SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536)]  # (N, K)
SCHEMES = {"int8": (WeightScheme(8), None), "int4_g32_asym": (WeightScheme(4, 32, False), None),
           "int4_g64": (WeightScheme(4, 64, True), None), "w8a8": (WeightScheme(8), 8),
           "w4a8_g64": (WeightScheme(4, 64, True), 8), "w4a8_g32_asym": (WeightScheme(4, 32, False), 8)}
# name: (weight scheme, activation bits)
KERNELS = ("int4_weight_only", "dequant_dense", "woq_amx", "fbgemm_w8a8", "onednn_w8a8", "w8a8_amx", "w4a8_vnni")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", default="16,64,256,1024")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=gen) * 0.02 for n, k in SHAPES]
    dense = []
    for w in weights:
        linear = nn.Linear(w.shape[1], w.shape[0], bias=False)
        linear.weight.data = w.bfloat16()
        dense.append(DenseLinear(linear))
    quant = {name: [QuantLinear.from_quantized(quantize_weight(w, scheme), act_bits=act_bits) for w in weights]
             for name, (scheme, act_bits) in SCHEMES.items()}
    for tokens in (int(t) for t in args.tokens.split(",")):
        xs = [torch.randn(tokens, k, generator=gen).bfloat16() for _, k in SHAPES]
        row = {"tokens": tokens, "bf16_dense": time_ms(lambda: [m(x) for m, x in zip(dense, xs)])}
        for name, layers in quant.items():
            for kernel in (KERNEL_REGISTRY[k] for k in KERNELS):
                if all(kernel.supports(layer.spec, torch.bfloat16) for layer in layers):
                    row[f"{name}/{kernel.name}"] = time_ms(lambda: [layer.run_kernel(x, kernel)
                                                                     for layer, x in zip(layers, xs)])
        print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()

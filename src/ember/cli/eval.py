"""`ember eval perplexity`: sliding-window perplexity of a model on a text file, as JSON."""

from __future__ import annotations

import argparse
import json
import time

from ember.config import KV_CACHE_DTYPES
from ember.progress import add_quiet_arg


def register(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate model quality")
    tasks = parser.add_subparsers(dest="task", required=True)
    ppl = tasks.add_parser("perplexity", help="perplexity on a text file (JSON output)")
    ppl.add_argument("--model", default=None, help="GGUF file, HF directory or quantized checkpoint "
                                                   "(default: the bundled model)")
    ppl.add_argument("--file", required=True, action="append", help="text file (repeat for several)")
    ppl.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ppl.add_argument("--window", type=int, default=512, help="tokens per window")
    ppl.add_argument("--stride", type=int, default=256, help="tokens between window starts")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score at most this many tokens per file")
    ppl.add_argument("--num-threads", type=int, default=None)
    ppl.add_argument("--kv-cache-dtype", default="auto", choices=list(KV_CACHE_DTYPES),
                     help="KV-cache storage, as the engine's flag")
    ppl.add_argument("--kv-scales", default=None, help="int8-static: kv_scales.safetensors or its directory "
                                                       "(default: the model's directory)")
    ppl.add_argument("--kv-outlier-residual", action="store_true", help="int8-static: 4-bit residuals for outliers")
    ppl.add_argument("--kv-outlier-factor", type=float, default=3.0)
    ppl.add_argument("--prefill-chunk", type=int, default=None,
                     help="prefill each window in chunks of this many tokens, so they attend to earlier tokens "
                          "through the (possibly int8) cache; default: one pass per window")
    add_quiet_arg(ppl)
    ppl.set_defaults(func=cmd_perplexity)


def cmd_perplexity(args: argparse.Namespace) -> None:
    import torch

    from ember.config import default_num_threads
    from ember.attention.layer_cache import cache_statistics, create_layer_caches
    from ember.eval.perplexity import model_cache_spec, perplexity
    from ember.loader.model_loader import load_model, resolve_model_path
    from ember.loader.tokenizer import Tokenizer
    from ember.quant.kv_scales import resolve_kv_scales

    torch.set_num_threads(args.num_threads or default_num_threads())
    path = resolve_model_path(args.model)
    model, _ = load_model(path, getattr(torch, args.dtype), progress=not args.quiet)
    tokenizer = Tokenizer.from_path(path)
    try:
        kv_scales = resolve_kv_scales(args.kv_cache_dtype, args.kv_scales, path)
    except ValueError as err:
        raise SystemExit(str(err)) from None
    spec = model_cache_spec(model, args.kv_cache_dtype, outlier_residual=args.kv_outlier_residual,
                            outlier_factor=args.kv_outlier_factor)
    caches = create_layer_caches(spec, -(-args.window // spec.block_size), kv_scales)
    start = time.monotonic()
    nll, count, files = 0.0, 0, []
    for file in args.file:
        with open(file, encoding="utf-8", errors="replace") as f:
            ids = tokenizer.encode(f.read(), add_special_tokens=False)
        result = perplexity(model, ids, args.window, args.stride, args.max_tokens, caches, args.prefill_chunk,
                            progress=not args.quiet)
        nll += result.nll_sum
        count += result.num_tokens
        files.append({"file": file, **result.to_dict()})
    import math
    print(json.dumps({"model": args.model or "SmolLM2-135M-Instruct", "dtype": args.dtype,
                      "perplexity": math.exp(nll / count), "num_tokens": count, "window": args.window,
                      "stride": args.stride, "prefill_chunk": args.prefill_chunk,
                      "kv_cache": cache_statistics(spec, caches), "files": files,
                      "elapsed_s": round(time.monotonic() - start, 2)}, indent=1))

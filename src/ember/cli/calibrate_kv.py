"""`ember calibrate-kv`: per-channel KV-cache scales for `--kv-cache-dtype int8-static`."""

from __future__ import annotations

import argparse
import json
import time

from ember.cli.calibration import add_calibration_args
from ember.progress import add_quiet_arg


def register(subparsers) -> None:
    parser = subparsers.add_parser("calibrate-kv", help="calibrate static int8 KV-cache scales (kv_scales.safetensors)")
    parser.add_argument("--model", default=None, help="GGUF file, HF directory or quantized checkpoint "
                                                      "(default: the bundled model)")
    parser.add_argument("--dtype", default="float32", choices=["bfloat16", "float32"])
    add_calibration_args(parser, num_samples=32)
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--output", required=True,
                        help="directory for kv_scales.safetensors (a quantized checkpoint's own directory keeps "
                             "the scales with its weights)")
    add_quiet_arg(parser)
    parser.set_defaults(func=cmd_calibrate_kv)


def cmd_calibrate_kv(args: argparse.Namespace) -> None:
    import torch

    from ember.cli.calibration import describe_calibration, load_calibration
    from ember.config import default_num_threads
    from ember.loader.model_loader import load_model, resolve_model_path
    from ember.loader.tokenizer import Tokenizer
    from ember.quant.kv_scales import calibrate_kv_scales, save_kv_scales

    torch.set_num_threads(args.num_threads or default_num_threads())
    path = resolve_model_path(args.model)
    model, _ = load_model(path, getattr(torch, args.dtype), progress=not args.quiet)
    batches = load_calibration(args, Tokenizer.from_path(path))
    start = time.monotonic()
    scales = calibrate_kv_scales(model, batches, progress=not args.quiet)
    info = {"model": args.model or "SmolLM2-135M-Instruct", "dtype": args.dtype, "statistic": "absmax / 127",
            "calibration": describe_calibration(args)}
    written = save_kv_scales(args.output, scales, info)
    print(json.dumps({"output": str(written), "num_layers": len(scales),
                      "elapsed_s": round(time.monotonic() - start, 1), **info}, indent=1))

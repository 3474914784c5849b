"""`ember quantize`: quantize a model with RTN, AWQ, GPTQ or SmoothQuant into a checkpoint directory."""

from __future__ import annotations

import argparse
import json
import time


def register(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="write a quantized checkpoint directory")
    parser.add_argument("--model", default=None, help="GGUF file or HF directory (default: the bundled model)")
    parser.add_argument("--method", default="rtn", choices=["rtn", "awq", "gptq", "smoothquant"])
    parser.add_argument("--bits", type=int, default=8, choices=[8, 4])
    parser.add_argument("--group-size", type=int, default=None, help="input channels per scale (4-bit)")
    parser.add_argument("--asymmetric", action="store_true", help="zero points (4-bit)")
    parser.add_argument("--act-bits", type=int, default=None, choices=[8],
                        help="dynamic int8 activations: per token with --bits 8 (W8A8; implied by smoothquant), "
                             "per token and weight group with --bits 4 (W4A8)")
    parser.add_argument("--rotate", action="store_true", help="fold a Hadamard rotation in first (QuaRot)")
    parser.add_argument("--alpha", type=float, default=None, help="SmoothQuant migration strength")
    parser.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by Hessian diagonal")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--calib-seq-len", type=int, default=256)
    parser.add_argument("--calib-file", action="append", default=None,
                        help="calibration text (default: Shakespeare calibration plays)")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    parser.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    from ember.config import default_num_threads
    from ember.eval.datasets import CALIBRATION_PLAYS, play_paths, read_texts
    from ember.loader.hf_export import to_hf_model
    from ember.loader.model_loader import load_state, resolve_model_path
    from ember.loader.tokenizer import Tokenizer
    from ember.quant import QuantConfig, quantize_model, sample_calibration_batches, save_quantized

    torch.set_num_threads(args.num_threads or default_num_threads())
    path = resolve_model_path(args.model)
    act_bits = 8 if args.method == "smoothquant" else args.act_bits
    calib_files = args.calib_file or play_paths(CALIBRATION_PLAYS)
    method_args = {"act_order": True} if args.act_order else {}
    config = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size,
                         symmetric=not args.asymmetric, act_bits=act_bits, rotate=args.rotate,
                         alpha=args.alpha, method_args=method_args,
                         calibration={"files": [f.rsplit("/", 1)[-1] for f in calib_files],
                                      "num_samples": args.calib_samples, "seq_len": args.calib_seq_len,
                                      "seed": 0})
    model_config, state = load_state(path)
    model = to_hf_model(model_config, state)
    tokenizer = Tokenizer.from_path(path)
    batches = None
    if config.needs_calibration:
        ids = torch.tensor(tokenizer.encode(read_texts(calib_files), add_special_tokens=False))
        batches = sample_calibration_batches(ids, args.calib_samples, args.calib_seq_len, seed=0)
    start = time.monotonic()
    replaced = quantize_model(model, config, calib_batches=batches)
    save_quantized(model, args.output, config)
    tokenizer.hf.save_pretrained(args.output)
    print(json.dumps({"output": args.output, "config": config.to_dict(), "quantized_modules": len(replaced),
                      "quantize_s": round(time.monotonic() - start, 1)}, indent=1))

"""Mixed precision on the evaluation split: uniform int4, the sensitivity-chosen bf16 set, random controls.

Quantizes the bundled model (GPTQ int4 g64 by default) once per setting, writes each checkpoint to a
scratch directory, loads it like `ember eval perplexity` does and scores King Lear + Julius Caesar
(first 4,096 tokens each, windows of 512, stride 256). Settings: uniform; the most sensitive ops in
bf16 up to `--bf16-budget` of the linear weights (ranked by `--rank-by` in the `--sensitivity`
report); `--seeds` random choices of ops with at most the same bf16 bytes; with `--bf16-channels F`,
GPTQ keeping each linear's most salient fraction F of input channels in bf16, and `--seeds` random
choices of as many channels; plus any `--checkpoint` directories (e.g. an `ember quantize --auto`
result). `--clip-search` runs GPTQ with its weighted clip search in every setting; `--bf16-channel-split`
shares the channels' bytes by op (salient and random alike); `--calibration-seed` draws other calibration
windows. Prints one JSON object.

    .venv/bin/python benchmarks/mixed_precision.py --sensitivity sens.json --bf16-budget 0.10
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import tempfile
import time


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sensitivity", required=True, help="report from `ember analyze sensitivity`")
    parser.add_argument("--method", default="gptq", choices=["rtn", "gptq", "awq"])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--bf16-budget", type=float, default=0.10)
    parser.add_argument("--rank-by", action="append", default=None,
                        help="metric ranking the ops (repeat for several mixes; the first sizes the random controls)")
    parser.add_argument("--bf16-channels", type=float, default=0.0, metavar="FRACTION",
                        help="also score GPTQ keeping this fraction of each linear's input channels in bf16 "
                             "(salient, and random controls)")
    parser.add_argument("--bf16-channel-split", default=None, metavar="OP=WEIGHT[,OP=WEIGHT...]",
                        help="share the channels' bytes within each layer by op weight "
                             "(`ember quantize --bf16-channel-split`), salient and random alike")
    parser.add_argument("--calibration-seed", type=int, default=0,
                        help="seed of the 16 calibration windows (the same windows for every setting)")
    parser.add_argument("--clip-search", action="store_true",
                        help="GPTQ's weighted clip search (`ember quantize --clip-search`) in every setting")
    parser.add_argument("--seeds", type=int, default=3, help="random controls")
    parser.add_argument("--first-seed", type=int, default=0, help="seed of the first random control")
    parser.add_argument("--checkpoint", action="append", default=[], help="extra checkpoint directories to score")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--max-tokens", type=int, default=4096, help="tokens scored per evaluation play")
    parser.add_argument("--skip", action="append", default=[],
                        help="settings to skip: float, uniform, mix, random, channels (the salient-channel one)")
    return parser.parse_args(argv)


def evaluation_ppl(model_dir: str | None, dtype: str, max_tokens: int) -> float:
    """Perplexity of a checkpoint (or the bundled model) on the evaluation plays, as `ember eval perplexity`."""
    import torch

    from ember.eval.datasets import EVALUATION_PLAYS, play_paths
    from ember.eval.perplexity import perplexity
    from ember.loader.model_loader import load_model, resolve_model_path
    from ember.loader.tokenizer import Tokenizer

    path = resolve_model_path(model_dir)
    model, _ = load_model(path, getattr(torch, dtype))
    tokenizer = Tokenizer.from_path(resolve_model_path(None))
    nll, count = 0.0, 0
    for file in play_paths(EVALUATION_PLAYS):
        with open(file, encoding="utf-8", errors="replace") as f:
            ids = tokenizer.encode(f.read(), add_special_tokens=False)
        result = perplexity(model, ids, 512, 256, max_tokens)
        nll, count = nll + result.nll_sum, count + result.num_tokens
    return math.exp(nll / count)


def quantize_and_score(float_model, batches, precisions: dict[str, str], args, scratch: str,
                       bf16_channels: float = 0.0, method_args: dict | None = None) -> tuple[float, dict]:
    """Perplexity of the checkpoint written for this setting, and its float-channel bytes (when it keeps some)."""
    from ember.cli.quantize import parse_channel_split
    from ember.quant import QuantConfig, QuantLinear, quantize_model, save_quantized

    method_args = {**(method_args or {}), **({"clip_search": True} if args.clip_search else {})}
    if bf16_channels and args.bf16_channel_split:
        method_args["channel_split"] = parse_channel_split(args.bf16_channel_split)
    config = QuantConfig(method=args.method, bits=4, group_size=args.group_size, precisions=precisions,
                         calibration={"files": "calibration plays", "num_samples": 16, "seq_len": 256,
                                      "seed": args.calibration_seed},
                         bf16_channels=bf16_channels, method_args=method_args)
    model = copy.deepcopy(float_model)
    quantize_model(model, config, calib_batches=batches)
    save_quantized(model, scratch, config)
    layers = [m for m in model.modules() if isinstance(m, QuantLinear)]
    extra = {}
    if config.bf16_channels:
        kept = sum(m.channel_weight.numel() for m in layers)
        extra = {"channel_bf16_bytes": 2 * kept, "channel_index_bytes": sum(m.channel_index.nbytes for m in layers),
                 "codes_bytes": sum(m.qweight.nbytes + m.scales.nbytes for m in layers),
                 "bf16_fraction": kept / sum(m.in_features * m.out_features for m in layers)}
        extra["weight_bytes"] = extra["channel_bf16_bytes"] + extra["channel_index_bytes"] + extra["codes_bytes"]
    return evaluation_ppl(scratch, args.dtype, args.max_tokens), extra


def main() -> None:
    args = parse_args()
    import torch

    from ember.analysis.report import SensitivityReport
    from ember.eval.datasets import CALIBRATION_PLAYS, play_paths, read_texts
    from ember.loader.hf_export import to_hf_model
    from ember.loader.model_loader import load_state, resolve_model_path
    from ember.loader.tokenizer import Tokenizer
    from ember.quant.calibration import sample_calibration_batches
    from ember.quant.plan import budget_plan, decoder_ops, linear_precisions, op_shapes, op_weight_bytes, random_plan

    path = resolve_model_path(None)
    model_config, state = load_state(path)
    float_model = to_hf_model(model_config, state)
    tokenizer = Tokenizer.from_path(path)
    ids = torch.tensor(tokenizer.encode(read_texts(play_paths(CALIBRATION_PLAYS)), add_special_tokens=False))
    batches = sample_calibration_batches(ids, 16, 256, seed=args.calibration_seed)
    ops = decoder_ops(model_config.num_hidden_layers)
    shapes = op_shapes(float_model, ops)
    report = SensitivityReport.load(args.sensitivity)
    metrics = args.rank_by or ["kl"]
    mixes = {m: budget_plan([r for r in report.ranking(m) if r in shapes], shapes, args.bf16_budget) for m in metrics}
    chosen_bytes = sum(op_weight_bytes(shapes[r], "bf16") for r in mixes[metrics[0]])

    def weight_bytes(kept) -> int:
        return sum(op_weight_bytes(shapes[r], "bf16" if r in kept else "int4", args.group_size) for r in ops)

    settings = [("uniform", [])]
    settings += [(f"sensitivity {m} top {args.bf16_budget:.0%}", kept) for m, kept in mixes.items()]
    settings += [(f"random seed {s}", random_plan(ops, shapes, chosen_bytes, s))
                 for s in range(args.first_seed, args.first_seed + args.seeds)]
    rows = []
    base = None if "float" in args.skip else evaluation_ppl(None, args.dtype, args.max_tokens)
    with tempfile.TemporaryDirectory() as scratch:
        for label, kept in settings:
            if label.split()[0] in args.skip or (label.startswith("sensitivity") and "mix" in args.skip):
                continue
            start = time.monotonic()
            ppl, _ = quantize_and_score(float_model, batches, linear_precisions({r: "bf16" for r in kept}), args,
                                        scratch)
            rows.append({"setting": label, "bf16_ops": [r.key() for r in kept], "weight_bytes": weight_bytes(kept),
                         "bf16_fraction": sum(op_weight_bytes(shapes[r], "bf16") for r in kept)
                         / sum(op_weight_bytes(s, "bf16") for s in shapes.values()),
                         "ppl": ppl, "seconds": round(time.monotonic() - start, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
        channel_settings = [("salient channels", {})] if "channels" not in args.skip else []
        channel_settings += [(f"random channels seed {s}", {"channel_order": "random", "channel_seed": s})
                             for s in range(args.first_seed, args.first_seed + args.seeds)]
        for label, method_args in channel_settings if args.bf16_channels else []:
            start = time.monotonic()
            ppl, extra = quantize_and_score(float_model, batches, {}, args, scratch, bf16_channels=args.bf16_channels,
                                            method_args=method_args)
            rows.append({"setting": f"{label} {args.bf16_channels:.0%}", "ppl": ppl, **extra,
                         "seconds": round(time.monotonic() - start, 1)})
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    for directory in args.checkpoint:
        rows.append({"setting": directory, "ppl": evaluation_ppl(directory, args.dtype, args.max_tokens),
                     **_checkpoint_bytes(directory, shapes, args.group_size)})
    for row in rows:
        row["dppl_percent"] = None if base is None else 100 * (row["ppl"] / base - 1)
    print(json.dumps({"dtype": args.dtype, "float_ppl": base, "method": args.method, "group_size": args.group_size,
                      "rank_by": metrics, "rows": rows}, indent=1))


def _checkpoint_bytes(directory: str, shapes, group_size: int) -> dict:
    """Linear weight bytes of a checkpoint from the precision it records for each linear."""
    from ember.quant.checkpoint import QUANT_CONFIG_NAME
    from ember.quant.plan import op_weight_bytes

    precisions = json.loads(open(os.path.join(directory, QUANT_CONFIG_NAME)).read()).get("module_precisions", {})
    total = 0
    for ref, dims in shapes.items():
        for name, dim in zip(ref.linear_names(), dims):
            total += op_weight_bytes([dim], precisions.get(name, "bf16"), group_size)
    counts = {p: sum(1 for v in precisions.values() if v == p) for p in ("int4", "int8", "bf16")}
    return {"weight_bytes": total, "linear_counts": counts}


if __name__ == "__main__":
    main()

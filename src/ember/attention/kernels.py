"""Native CPU kernels (paged decode attention, fused bfloat16 elementwise ops), compiled on first use."""

from __future__ import annotations

import functools
import logging
import os
from types import ModuleType

logger = logging.getLogger(__name__)

_SOURCES = [os.path.join(os.path.dirname(__file__), "csrc", name) for name in ("paged_decode.cpp", "fused_ops.cpp")]


def compile_extension(name: str, sources: list[str], *, fast_math: bool) -> ModuleType | None:
    """Build (or reuse from torch's cache) a C++ extension for this CPU; None if that fails.

    Set EMBER_DISABLE_NATIVE=1 to force the PyTorch reference paths.
    """
    if os.environ.get("EMBER_DISABLE_NATIVE") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        # without fast math, also no fused multiply-add contraction: results round like PyTorch's
        flags = ["-O3", "-march=native", "-fopenmp"] + (["-ffast-math"] if fast_math else ["-ffp-contract=off"])
        return load(name=name, sources=sources, extra_cflags=flags, extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler or headers: stay correct, just slower
        logger.warning("native extension %s unavailable, using the PyTorch path: %s", name, err)
        return None


@functools.cache
def native_ops() -> ModuleType | None:
    """The compiled attention/elementwise module, or None (callers then use the PyTorch path)."""
    return compile_extension("ember_native", _SOURCES, fast_math=True)

"""Native CPU kernels (paged decode attention, fused bfloat16 elementwise ops), compiled on first use."""

from __future__ import annotations

import functools
import logging
import os

logger = logging.getLogger(__name__)

_SOURCES = [os.path.join(os.path.dirname(__file__), "csrc", name) for name in ("paged_decode.cpp", "fused_ops.cpp")]


@functools.cache
def native_ops():
    """The compiled extension module, or None (callers then use the PyTorch reference path).

    Set EMBER_DISABLE_NATIVE=1 to force the reference path.
    """
    if os.environ.get("EMBER_DISABLE_NATIVE") == "1":
        return None
    try:
        from torch.utils.cpp_extension import load

        return load(name="ember_native", sources=_SOURCES, extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as err:  # no compiler or headers: stay correct, just slower
        logger.warning("native attention kernel unavailable, using the PyTorch path: %s", err)
        return None

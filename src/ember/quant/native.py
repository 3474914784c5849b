"""Native helpers of the quantized kernels and the AMX matmuls (``csrc/``), compiled on first use."""
from __future__ import annotations

import functools
import os
from types import ModuleType

from ember.attention.kernels import compile_extension

_SOURCES = [os.path.join(os.path.dirname(__file__), "csrc", name)
            for name in ("quant_ops.cpp", "woq_amx.cpp", "w8a8_amx.cpp", "bf16_amx.cpp", "int8_gemv.cpp",
                         "bf16_gemv.cpp", "w4a8_vnni.cpp")]


@functools.cache
def quant_ops() -> ModuleType | None:
    """``dequantize_bf16``, ``quantize_rows_int8``, ``rescale_rows``, ``has_amx``, ``woq_linear_amx``,
    ``has_amx_int8``, ``w8a8_linear_amx``, ``bf16_linear_amx``, ``has_int8_gemv``, ``int8_gemv``,
    ``has_bf16_gemv``, ``bf16_gemv``, ``has_w4a8_vnni``, ``w4a8_linear`` and
    ``quantize_groups_int8``, or None without a compiler.

    Built without -ffast-math: activation codes must round exactly as the PyTorch reference does.
    """
    return compile_extension("ember_quant_native", _SOURCES, fast_math=False)

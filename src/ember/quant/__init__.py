"""Quantization toolkit: RTN, AWQ, GPTQ, SmoothQuant, Hadamard rotation, quantized linears, checkpoints.

Names are imported on first use, so serving a quantized checkpoint (``ember.quant.checkpoint``) does not
import the calibration methods.
"""
from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "quantize_model": "api", "smooth_model": "api", "target_linears": "api",
    "ChannelStats": "calibration", "capture_activations": "calibration", "collect_layer_inputs": "calibration",
    "run_layer": "calibration", "sample_calibration_batches": "calibration",
    "load_quantized": "checkpoint", "load_quantized_state": "checkpoint", "save_quantized": "checkpoint",
    "QuantConfig": "config", "QuantLinear": "linear", "rotate_model": "rotation",
    "quantize_weight": "rtn", "sqnr_db": "rtn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)

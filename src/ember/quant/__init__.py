"""Quantization toolkit: RTN, AWQ, GPTQ, SmoothQuant, Hadamard rotation, CPU kernels, checkpoints."""
from ember.quant.api import quantize_model, smooth_model, target_linears
from ember.quant.calibration import (ChannelStats, capture_activations, collect_layer_inputs, run_layer,
                                     sample_calibration_batches)
from ember.quant.checkpoint import load_quantized, load_quantized_state, save_quantized
from ember.quant.config import QuantConfig
from ember.quant.kernels import KERNEL_REGISTRY, KernelBackend, KernelPolicy
from ember.quant.linear import QuantLinear
from ember.quant.rotation import rotate_model
from ember.quant.rtn import QuantizedWeight, WeightScheme, dequantize_codes, quantize_weight, sqnr_db

__all__ = [
    "ChannelStats", "KERNEL_REGISTRY", "KernelBackend", "KernelPolicy", "QuantConfig", "QuantLinear",
    "QuantizedWeight", "WeightScheme", "capture_activations", "collect_layer_inputs", "dequantize_codes",
    "load_quantized", "load_quantized_state", "quantize_model", "quantize_weight", "rotate_model",
    "run_layer", "sample_calibration_batches", "save_quantized", "smooth_model", "sqnr_db", "target_linears",
]

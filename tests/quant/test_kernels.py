"""Every CPU kernel equals the dequantize-then-matmul reference path within a stated tolerance."""
import pytest
import torch

from ember.kernels.linear.reference import REFERENCE
from ember.kernels.linear.registry import KERNEL_REGISTRY, KernelPolicy, KernelUnavailableError
from ember.kernels.cpu import cpu_features
from ember.kernels.ops import native_has
from ember.quant.linear import QuantLinear
from ember.quant.rtn import WeightScheme, quantize_weight

# Relative Frobenius error vs the float32 reference: float32 kernels differ only by summation
# order; half-precision activations add their own rounding (bf16: 8-bit mantissa); fbgemm rounds
# row-normalised activations to asymmetric uint8 where the reference uses symmetric int8 per token
# (measured 0.8-0.9%).
TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}
FBGEMM_TOLERANCE = 1.5e-2

CASES = [  # (kernel, scheme, act_bits, in_features)
    ("int8_weight_only", WeightScheme(8), None, 128),
    ("int8_weight_only", WeightScheme(8), None, 72),
    ("int8_gemv", WeightScheme(8), None, 128),
    ("int8_dpbf16", WeightScheme(8), None, 128),
    ("int4_dpbf16", WeightScheme(4, 32, True), None, 128),
    ("int4_dpbf16", WeightScheme(4, 64, False), None, 192),
    ("int4_weight_only", WeightScheme(4, 32, True), None, 128),
    ("int4_weight_only", WeightScheme(4, 64, False), None, 192),
    ("int4_weight_only", WeightScheme(4, 128, True), None, 256),
    ("w8a8_gemv", WeightScheme(8), 8, 72),
    ("fbgemm_w8a8", WeightScheme(8), 8, 128),
    ("int_mm_w8a8", WeightScheme(8), 8, 72),
    ("onednn_w8a8", WeightScheme(8), 8, 72),
    ("w8a8_amx", WeightScheme(8), 8, 128),
    ("reference", WeightScheme(4, 64, False), None, 128),
    ("dequant_dense", WeightScheme(4, 64, False), None, 128),
    ("dequant_dense", WeightScheme(4, 32, True), None, 96),
    ("dequant_dense", WeightScheme(8), None, 72),
]


def _layer(scheme, act_bits, in_features, bias=True):
    gen = torch.Generator().manual_seed(in_features)
    weight = torch.randn(48, in_features, generator=gen) * 0.05
    bias_t = torch.randn(48, generator=gen) if bias else None
    return QuantLinear.from_quantized(quantize_weight(weight, scheme), bias_t, act_bits=act_bits)


def _rel(a, b):
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.mark.parametrize("name, scheme, act_bits, in_features", CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("num_tokens", [1, 5, 33])
def test_kernel_matches_reference(name, scheme, act_bits, in_features, dtype, num_tokens):
    layer = _layer(scheme, act_bits, in_features)
    kernel = KERNEL_REGISTRY[name]
    if not kernel.supports(layer.spec, dtype):
        assert ((name in ("fbgemm_w8a8", "onednn_w8a8") and not cpu_features().vnni)
                or (name == "int8_weight_only" and dtype == torch.bfloat16 and in_features % 16)
                or (name == "onednn_w8a8" and (dtype == torch.float16 or not native_has("quant")
                                               or not cpu_features().vnni))
                or (name == "w8a8_amx" and (dtype == torch.float16 or not native_has("quant", "amx")))
                or (name == "w8a8_gemv" and (dtype == torch.float16 or not native_has("quant", "avx512_vnni")))
                or (name in ("int8_gemv", "int8_dpbf16", "int4_dpbf16")
                    and (dtype != torch.bfloat16 or not native_has("quant", "avx512_bf16"))))
        return
    x = torch.randn(num_tokens, in_features, generator=torch.Generator().manual_seed(num_tokens))
    reference = layer.run_kernel(x, REFERENCE)  # float32
    out = layer.run_kernel(x.to(dtype), kernel)
    assert out.dtype == dtype and out.shape == (num_tokens, 48)
    tolerance = FBGEMM_TOLERANCE if name == "fbgemm_w8a8" else TOLERANCE[dtype]
    assert _rel(out, reference) < tolerance


def test_reference_equals_float_linear_on_dequantized_weight():
    layer = _layer(WeightScheme(4, 32, False), None, 64)
    x = torch.randn(3, 7, 64)
    expected = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    assert layer(x).shape == (3, 7, 48)


def test_int8_bf16_refused_when_k_not_multiple_of_16():
    layer = _layer(WeightScheme(8), None, 72)
    assert not KERNEL_REGISTRY["int8_weight_only"].supports(layer.spec, torch.bfloat16)
    assert layer.select_kernel(1, torch.bfloat16).name == "dequant_dense"
    assert KernelPolicy(packed_dtypes=(torch.float32,)).select(layer.spec, 1, torch.float32).name == "int8_weight_only"


def test_policy_selection():
    int4 = _layer(WeightScheme(4, 64, True), None, 128)
    assert int4.select_kernel(1, torch.bfloat16).name == "int4_weight_only"
    amx, panels = native_has("quant", "amx"), native_has("quant", "avx512_bf16")
    batched = "woq_amx" if amx else "int4_dpbf16" if panels else "dequant_dense"
    assert int4.select_kernel(5, torch.bfloat16).name == ("int4_weight_only" if batched == "dequant_dense" else batched)
    assert int4.select_kernel(64, torch.bfloat16).name == batched  # prefill
    # beyond woq_amx's 1024 tokens
    assert int4.select_kernel(4096, torch.bfloat16).name == ("int4_dpbf16" if batched == "int4_dpbf16" else "dequant_dense")
    assert int4.select_kernel(1, torch.float32).name == "dequant_dense"  # packed int4 is slow in fp32
    w8a8 = _layer(WeightScheme(8), 8, 128)
    assert w8a8.select_kernel(64, torch.float32).name in ("w8a8_amx", "onednn_w8a8", "int_mm_w8a8")
    assert w8a8.select_kernel(1, torch.float32).name in ("w8a8_amx", "w8a8_gemv", "fbgemm_w8a8", "onednn_w8a8",
                                                         "int_mm_w8a8")
    forced = _layer(WeightScheme(8), 8, 128)
    forced.policy = KernelPolicy(forced=("int_mm_w8a8",))
    assert forced.select_kernel(1, torch.float32).name == "int_mm_w8a8"
    with pytest.raises(ValueError):
        KernelPolicy(forced=("nope",))


def test_prepared_operands_refresh_on_load():
    layer = _layer(WeightScheme(4, 64, True), None, 128)
    other = _layer(WeightScheme(4, 64, True), None, 128, bias=True)
    with torch.no_grad():
        other.scales.mul_(2)
    x = torch.randn(1, 128)
    layer(x)  # builds int4 operands
    layer.load_state_dict(other.state_dict())
    torch.testing.assert_close(layer(x), other.run_kernel(x, REFERENCE), rtol=1e-5, atol=1e-5)


def test_dtype_cast_keeps_scales_float32():
    layer = _layer(WeightScheme(4, 64, True), None, 128)
    x = torch.randn(2, 128)
    expected = layer.run_kernel(x, REFERENCE)
    model = torch.nn.Sequential(layer).to(torch.bfloat16)
    assert layer.scales.dtype == torch.float32 and layer.bias.dtype == torch.float32
    assert layer.qweight.dtype == torch.uint8
    assert _rel(model(x.bfloat16()), expected) < TOLERANCE[torch.bfloat16]


@pytest.mark.parametrize("name", ["fbgemm_w8a8", "int_mm_w8a8", "onednn_w8a8", "w8a8_amx"])
def test_w8a8_activation_scale_is_per_token(name):
    # one token with massive activations (an attention sink) must not crush the other rows
    layer = _layer(WeightScheme(8), 8, 128)
    if not KERNEL_REGISTRY[name].supports(layer.spec, torch.float32):
        pytest.skip(f"{name} is not available here")
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    x[0] *= 300.0
    exact = torch.nn.functional.linear(x, layer.dequantize(), layer.bias)
    out = layer.run_kernel(x, KERNEL_REGISTRY[name])
    assert _rel(out[1:], exact[1:]) < 1.5e-2


def test_forward_follows_a_new_policy():
    # decode-sized calls reuse their kernel choice; replacing the policy must drop that choice
    layer = _layer(WeightScheme(4, 64, True), None, 128)
    x = torch.randn(1, 128).to(torch.bfloat16)
    default = layer(x)
    assert torch.equal(default, layer.run_kernel(x, layer.select_kernel(1, torch.bfloat16)))
    layer.policy = KernelPolicy(forced=("reference",))
    assert torch.equal(layer(x), layer.run_kernel(x, REFERENCE))


def test_disabled_kernels_are_never_chosen():
    int4 = _layer(WeightScheme(4, 64, True), None, 128)
    assert int4.select_kernel(1, torch.bfloat16).name == "int4_weight_only"
    int4.policy = KernelPolicy(disabled={"int4_weight_only"})
    assert int4.select_kernel(1, torch.bfloat16).name in ("woq_amx", "int4_dpbf16", "dequant_dense")
    with pytest.raises(ValueError, match="cannot be disabled"):
        KernelPolicy(disabled={"reference"})
    with pytest.raises(ValueError, match="one per kind"):
        KernelPolicy(forced=("int_mm_w8a8", "fbgemm_w8a8"))


def test_forced_kernel_that_cannot_run_raises():
    # int4_weight_only takes at most 48 tokens, and never a W8A8 layer: a forced choice is never bent
    int4 = _layer(WeightScheme(4, 64, True), None, 128)
    int4.policy = KernelPolicy(forced=("int4_weight_only",))
    assert int4.select_kernel(48, torch.bfloat16).name == "int4_weight_only"
    with pytest.raises(KernelUnavailableError, match="at most 48 tokens"):
        int4(torch.randn(49, 128).bfloat16())
    with pytest.raises(KernelUnavailableError, match="group length"):
        KernelPolicy(forced=("int4_weight_only",)).check_forced(_layer(WeightScheme(4, 48, True), None, 96).spec,
                                                               torch.bfloat16)

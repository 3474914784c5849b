"""W4A8: 4-bit weights against int8 activations quantized per token and weight group (csrc/w4a8_vnni.cpp)."""
import pytest
import torch
import torch.nn.functional as F

from ember.kernels.linear.pack import unpack_int4
from ember.kernels.linear.reference import REFERENCE, quantize_per_group
from ember.kernels.linear.registry import KERNEL_REGISTRY, KernelPolicy, KernelUnavailableError
from ember.kernels.linear.tiles import vnni_codes
from ember.kernels.ops import native_has, quant_ops
from ember.quant.linear import QuantLinear
from ember.quant.rtn import WeightScheme, quantize_weight, sqnr_db

needs_vnni = pytest.mark.skipif(not (native_has("quant", "avx512_vnni") and native_has("quant", "avx512_bf16")), reason="needs the native AVX512-VNNI kernel")
W4A8 = KERNEL_REGISTRY["w4a8_vnni"]


def _layer(n, k, scheme, bias=True, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, k, generator=gen) * 0.05
    bias_t = torch.randn(n, generator=gen) if bias else None
    return QuantLinear.from_quantized(quantize_weight(weight, scheme), bias_t, act_bits=8)


def _activations(m, k, seed=1):
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[:, 3] *= 40.0  # an outlier channel, as real hidden states have: it only coarsens its own block
    return x


def test_vnni_codes_layout():
    codes = torch.randint(0, 16, (32, 64), dtype=torch.uint8)
    packed = vnni_codes(codes[:, 0::2] | (codes[:, 1::2] << 4))
    assert packed.shape == (2, 8, 64)
    for block, chunk, lane, i in [(0, 0, 0, 0), (1, 7, 15, 3), (0, 3, 9, 2), (1, 5, 4, 1)]:
        byte = int(packed[block, chunk, 4 * lane + i])
        row = 16 * block + lane
        assert byte & 0x0F == codes[row, 8 * chunk + i]
        assert byte >> 4 == codes[row, 8 * chunk + 4 + i]
    # every code appears exactly once
    unpacked = unpack_int4(packed.view(32, -1)).flatten()
    assert torch.equal(torch.sort(unpacked).values, torch.sort(codes.flatten()).values)


def test_reference_is_the_matmul_of_dequantized_operands():
    layer = _layer(48, 128, WeightScheme(4, 32, False))
    x = _activations(5, 128)
    codes, scales = quantize_per_group(x, 32)
    x_deq = (codes.double().view(5, 4, 32) * scales.double().unsqueeze(2)).view(5, 128)
    weight = layer.quantized_weight()
    w_deq = (weight.codes().double().view(48, 4, 32) * weight.scales.double().unsqueeze(2)
             + weight.group_offsets().double().unsqueeze(2)).view(48, 128)
    expected = F.linear(x_deq, w_deq, layer.bias.double())
    torch.testing.assert_close(layer.run_kernel(x.double(), REFERENCE).double(), expected, rtol=1e-12, atol=1e-12)


@needs_vnni
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_activation_codes_equal_reference(dtype):
    x = _activations(7, 192).to(dtype)
    codes, scales, scaled_sums = quant_ops().quantize_groups_int8(x, 64)
    ref_codes, ref_scales = quantize_per_group(x, 64)
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)
    sums = ref_codes.view(7, 3, 64).sum(dim=2, dtype=torch.int32).float()
    assert torch.equal(scaled_sums, ref_scales * sums)


@needs_vnni
@pytest.mark.parametrize("scheme", [WeightScheme(4, 32, False), WeightScheme(4, 64, True), WeightScheme(4, 128, True),
                                    WeightScheme(4, 32, True)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 17, 64, 130])
@pytest.mark.parametrize("n", [16, 48, 96])
@pytest.mark.parametrize("bias", [True, False])
def test_kernel_matches_float64_reference(scheme, m, n, bias):
    k = 256
    layer = _layer(n, k, scheme, bias=bias, seed=m + n)
    x = _activations(m, k, seed=m)
    reference = layer.run_kernel(x.double(), REFERENCE)  # float64 from the same integer codes
    out = layer.run_kernel(x, W4A8)
    # float32 accumulation over groups: measured ~1e-7 relative; bounded by 1e-5 of the output scale
    assert out.dtype == torch.float32 and out.shape == (m, n)
    assert float((out.double() - reference).abs().max()) <= 1e-5 * float(reference.abs().max())
    out_bf16 = layer.run_kernel(x.to(torch.bfloat16), W4A8)
    ref_bf16 = layer.run_kernel(x.to(torch.bfloat16).double(), REFERENCE)
    # one bf16 rounding of the float32 result (relative 2^-9), plus the float32 error above
    bound = ref_bf16.abs() * 2.0 ** -8 + 1e-5 * float(ref_bf16.abs().max())
    assert torch.all((out_bf16.double() - ref_bf16).abs() <= bound)


@needs_vnni
def test_kernel_at_model_shapes_and_in_policy():
    layer = _layer(960, 576, WeightScheme(4, 64, True))
    assert KernelPolicy().select(layer.spec, 1, torch.bfloat16) is W4A8
    assert KernelPolicy().select(layer.spec, 1024, torch.float32) is W4A8
    for m in (1, 4, 48, 300):
        x = _activations(m, 576, seed=m)
        reference = layer.run_kernel(x.double(), REFERENCE)
        assert float((layer(x).double() - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_per_group_activations_cost_little_sqnr():
    # int4 weights put the output ~19 dB above its error; int8 activation blocks add noise ~36 dB below it
    # (measured 19.29 / 19.18 dB), one int8 scale per token only ~27 dB (the outlier channel sets it)
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 512, generator=gen) * 0.05
    x = _activations(64, 512)
    exact = F.linear(x, weight)
    quantized = quantize_weight(weight, WeightScheme(4, 64, True))
    weight_only = QuantLinear.from_quantized(quantized).run_kernel(x, REFERENCE)
    w4a8 = QuantLinear.from_quantized(quantized, act_bits=8).run_kernel(x, REFERENCE)
    per_token = quantize_per_group(x, 512)  # one block per token: the outlier channel crushes the rest
    x_token = per_token[0].float() * per_token[1]
    w4a8_token = F.linear(x_token, quantized.dequantize())
    assert sqnr_db(exact, w4a8) > sqnr_db(exact, weight_only) - 0.3
    assert sqnr_db(weight_only, w4a8) > 33.0
    assert sqnr_db(weight_only, w4a8) > sqnr_db(weight_only, w4a8_token) + 6.0


@pytest.mark.parametrize("name", ["w8a8_gemv", "fbgemm_w8a8", "int_mm_w8a8", "onednn_w8a8", "w8a8_amx",
                                  "int4_weight_only", "woq_amx", "dequant_dense"])
def test_other_kernels_refuse_w4a8_layers(name):
    # their per-token (W8A8) or bf16-weight (weight-only) numerics are not this layer's
    layer = _layer(48, 128, WeightScheme(4, 128, True))
    assert not KERNEL_REGISTRY[name].supports(layer.spec, torch.bfloat16)
    # forcing a kernel binds the layers of its own kind only; W4A8 layers keep their own choice
    assert KernelPolicy(forced=(name,)).select(layer.spec, 4, torch.bfloat16) is KernelPolicy().select(
        layer.spec, 4, torch.bfloat16)
    with pytest.raises(KernelUnavailableError, match="w4a8_vnni"):  # forced but unable: an error, not a fallback
        KernelPolicy(forced=("w4a8_vnni",)).check_forced(_layer(48, 128, WeightScheme(4, 8, True)).spec,
                                                         torch.bfloat16)

"""Native quantization helpers equal their PyTorch reference; fused layers equal their parts."""
import pytest
import torch

from ember.kernels.linear import w8a8
from ember.kernels.linear.reference import quantize_per_token
from ember.kernels.linear.registry import KERNEL_REGISTRY
from ember.kernels.ops import native_has, quant_ops
from ember.quant.linear import QuantLinear
from ember.quant.rtn import WeightScheme, quantize_weight

ops = quant_ops()
pytestmark = pytest.mark.skipif(ops is None, reason="no native build here")

# (scheme, K): groups of 24, 36 and 72 are not multiples of the 16-wide vector loop, so the scalar
# tails run too; groups of 32 and 64 take the vector loop only.
CASES = [(WeightScheme(8), 72), (WeightScheme(8, 24), 72), (WeightScheme(8, 64), 128),
         (WeightScheme(4, 32, False), 96), (WeightScheme(4, 64, True), 128), (WeightScheme(4, 24, True), 72),
         (WeightScheme(4, 36, False), 72)]


@pytest.mark.parametrize("scheme, in_features", CASES, ids=str)
def test_dequantize_bf16_is_bit_exact(scheme, in_features):
    weight = torch.randn(33, in_features, generator=torch.Generator().manual_seed(1))
    quantized = quantize_weight(weight, scheme)
    offsets = quantized.offsets if quantized.offsets is not None else torch.empty(0)
    ours = ops.dequantize_bf16(quantized.qweight, quantized.scales, offsets, scheme.bits, in_features)
    assert torch.equal(ours, quantized.dequantize(torch.bfloat16))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantize_rows_matches_reference(dtype):
    x = torch.randn(9, 200, generator=torch.Generator().manual_seed(2)) * 5
    x[3] = 0.0  # an all-zero row keeps the 1e-8 floor
    x[4, 7] = 900.0  # a massive activation only shrinks its own row's resolution
    x[5] = torch.arange(200) - 99.5  # exact halves before scaling exercise round-half-to-even
    codes, scales = ops.quantize_rows_int8(x.to(dtype))
    ref_codes, ref_scales = quantize_per_token(x.to(dtype))
    assert torch.equal(codes, ref_codes) and torch.equal(scales, ref_scales)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2 ** -8)])
def test_rescale_rows_matches_float64(dtype, tol):
    gen = torch.Generator().manual_seed(3)
    acc = torch.randint(-2 ** 20, 2 ** 20, (7, 40), dtype=torch.int32, generator=gen)
    x_scale, w_scale = torch.rand(7, 1, generator=gen), torch.rand(40, generator=gen)
    bias = torch.randn(40, generator=gen)
    expected = acc.double() * x_scale.double() * w_scale.double() + bias.double()
    ours = ops.rescale_rows(acc, x_scale, w_scale, bias, dtype)
    assert ours.dtype == dtype
    assert float(((ours.double() - expected).abs() / expected.abs().clamp(min=1.0)).max()) <= tol


@pytest.mark.parametrize("kernel", ["dequant_dense", "int8_weight_only", "int4_weight_only", "int_mm_w8a8",
                                    "fbgemm_w8a8"])
def test_concat_equals_separate_layers(kernel):
    scheme, act_bits = {"int4_weight_only": (WeightScheme(4, 32, False), None),
                        "int_mm_w8a8": (WeightScheme(8), 8), "fbgemm_w8a8": (WeightScheme(8), 8)}.get(
        kernel, (WeightScheme(8), None))
    gen = torch.Generator().manual_seed(4)
    parts = [QuantLinear.from_quantized(quantize_weight(torch.randn(n, 128, generator=gen), scheme), act_bits=act_bits)
             for n in (96, 32, 32)]
    fused = QuantLinear.concat(parts)
    x = torch.randn(5, 128, generator=gen).bfloat16()
    backend = KERNEL_REGISTRY[kernel]
    expected = torch.cat([p.run_kernel(x, backend) for p in parts], dim=-1).float()
    # same codes and scales, same kernel: only the matmul's blocking over N may differ
    torch.testing.assert_close(fused.run_kernel(x, backend).float(), expected, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(fused.dequantize(), torch.cat([p.dequantize() for p in parts]), rtol=0, atol=0)


def test_concat_refuses_mixed_schemes():
    a = QuantLinear.from_quantized(quantize_weight(torch.randn(8, 64), WeightScheme(8)))
    b = QuantLinear.from_quantized(quantize_weight(torch.randn(8, 64), WeightScheme(4, 32)))
    with pytest.raises(ValueError, match="same input size, scheme"):
        QuantLinear.concat([a, b])


def test_int_mm_row_chunks_equal_one_call(monkeypatch):
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(40, 96), WeightScheme(8)), act_bits=8)
    x = torch.randn(11, 96).bfloat16()
    whole = layer.run_kernel(x, KERNEL_REGISTRY["int_mm_w8a8"])
    monkeypatch.setattr(w8a8, "INT_MM_MAX_ROWS", 4)  # 11 rows -> chunks of 4, 4, 3
    assert torch.equal(layer.run_kernel(x, KERNEL_REGISTRY["int_mm_w8a8"]), whole)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_onednn_w8a8_equals_exact_integer_matmul(dtype):
    # both multiply the same per-token codes exactly; only the float rescale may round differently
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(40, 96), WeightScheme(8)), torch.randn(40),
                                       act_bits=8)
    reason = KERNEL_REGISTRY["onednn_w8a8"].why_not(layer.spec, dtype)
    if reason is not None:
        pytest.skip(reason)
    x = (torch.randn(37, 96) * 4).to(dtype)
    ours = layer.run_kernel(x, KERNEL_REGISTRY["onednn_w8a8"]).float()
    exact = layer.run_kernel(x, KERNEL_REGISTRY["int_mm_w8a8"]).float()
    torch.testing.assert_close(ours, exact, rtol=1e-5 if dtype == torch.float32 else 2 ** -7, atol=1e-5)


def test_shifted_codes_are_code_plus_128():
    x = torch.randn(5, 40) * 3
    codes, scales = ops.quantize_rows_int8(x)
    shifted, shifted_scales = ops.quantize_rows_int8(x, shift128=True)
    assert shifted.dtype == torch.uint8 and torch.equal(shifted_scales, scales)
    assert torch.equal(shifted.int() - 128, codes.int())


@pytest.mark.parametrize("out_features, in_features", [(48, 64), (7, 96), (960, 576), (576, 1536)])
@pytest.mark.parametrize("num_tokens", [1, 2, 3, 4])
@pytest.mark.skipif(not native_has("quant", "avx512_bf16"), reason="the int8 GEMV needs AVX512-BF16")
def test_int8_gemv_rounds_the_scaled_float32_sum_once(out_features, in_features, num_tokens):
    # y = scale * sum(x * code), float32 sums in another order (1e-5 of sum |x||w|), one bf16 rounding
    gen = torch.Generator().manual_seed(out_features + num_tokens)
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(out_features, in_features, generator=gen),
                                                       WeightScheme(8)))
    x = torch.randn(num_tokens, in_features, generator=gen).bfloat16()
    assert layer.select_kernel(num_tokens, torch.bfloat16).name == "int8_gemv"
    codes, scale = layer.qweight.float(), layer.scales.view(1, -1)
    exact = (x.float() @ codes.T) * scale
    ours = layer(x)
    assert ours.dtype == torch.bfloat16 and ours.shape == (num_tokens, out_features)
    bound = 2 ** -8 * exact.abs() + 1e-5 * (x.float().abs() @ codes.abs().T) * scale
    assert bool(((ours.float() - exact).abs() <= bound).all())



@pytest.mark.parametrize("out_features, in_features", [(48, 64), (16, 32), (80, 96), (960, 576), (576, 1536)])
@pytest.mark.parametrize("num_tokens", [1, 5, 12, 13, 40])
@pytest.mark.skipif(not native_has("quant", "avx512_bf16"), reason="int8_dpbf16 needs AVX512-BF16")
def test_int8_dpbf16_rounds_the_scaled_float32_sum_once(out_features, in_features, num_tokens):
    # int8_gemv's arithmetic for any number of rows: whole and partial 12-row blocks, an odd last
    # 16-channel block, the bias added after
    gen = torch.Generator().manual_seed(out_features + num_tokens)
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(out_features, in_features, generator=gen),
                                                       WeightScheme(8)), torch.randn(out_features, generator=gen))
    x = torch.randn(num_tokens, in_features, generator=gen).bfloat16()
    if num_tokens > 4 and not native_has("quant", "amx"):  # woq_amx takes these calls where AMX runs
        assert layer.select_kernel(num_tokens, torch.bfloat16).name == "int8_dpbf16"
    codes, scale = layer.qweight.float(), layer.scales.view(1, -1)
    exact = (x.float() @ codes.T) * scale
    ours = layer.run_kernel(x, KERNEL_REGISTRY["int8_dpbf16"])
    assert ours.dtype == torch.bfloat16 and ours.shape == (num_tokens, out_features)
    bias = layer.bias.bfloat16().float()
    bound = 2 ** -8 * exact.abs() + 1e-5 * (x.float().abs() @ codes.abs().T) * scale
    # the bias is added to the bf16 product in bf16 (one more rounding)
    assert bool(((ours.float() - exact - bias).abs() <= bound + 2 ** -8 * (exact + bias).abs()).all())


@pytest.mark.parametrize("out_features, in_features, scheme", [
    (48, 64, WeightScheme(4, 32, True)), (80, 96, WeightScheme(4, 32, False)),
    (960, 576, WeightScheme(4, 64, False)), (576, 1536, WeightScheme(4, 128, True))])
@pytest.mark.parametrize("num_tokens", [1, 5, 13, 40])
@pytest.mark.skipif(not native_has("quant", "avx512_bf16"), reason="int4_dpbf16 needs AVX512-BF16")
def test_int4_dpbf16_multiplies_the_bf16_dequantized_weight(out_features, in_features, scheme, num_tokens):
    # what dequant_dense's matmul computes: the weight dequantized to bf16 exactly as dequantize_bf16 does,
    # products summed in float32 (in another order), one bf16 rounding; the bias added after
    gen = torch.Generator().manual_seed(out_features + num_tokens)
    layer = QuantLinear.from_quantized(quantize_weight(torch.randn(out_features, in_features, generator=gen), scheme),
                                       torch.randn(out_features, generator=gen))
    x = torch.randn(num_tokens, in_features, generator=gen).bfloat16()
    offsets = layer.offsets if layer.offsets is not None else torch.empty(0)
    dense = quant_ops().dequantize_bf16(layer.qweight, layer.scales, offsets, 4, in_features).float()
    exact = x.float() @ dense.T
    ours = layer.run_kernel(x, KERNEL_REGISTRY["int4_dpbf16"])
    assert ours.dtype == torch.bfloat16 and ours.shape == (num_tokens, out_features)
    bias = layer.bias.bfloat16().float()
    bound = 2 ** -8 * exact.abs() + 1e-5 * (x.float().abs() @ dense.abs().T)
    assert bool(((ours.float() - exact - bias).abs() <= bound + 2 ** -8 * (exact + bias).abs()).all())


@pytest.mark.parametrize("scheme", [WeightScheme(4, 64, True), WeightScheme(4, 32, False)])
@pytest.mark.parametrize("num_tokens", [5, 13, 40])
@pytest.mark.skipif(not native_has("quant", "avx512_bf16"), reason="int4_dpbf16 needs AVX512-BF16")
def test_int4_dpbf16_takes_kept_float_channels_inside_its_panels(scheme, num_tokens):
    # input channels kept in float (even and odd k, the first and the last): each kept column of the bf16
    # weight becomes its codes' value plus its float part, rounded to bf16 once; the module adds nothing more
    out_features, in_features = 80, 192
    gen = torch.Generator().manual_seed(num_tokens)
    weight = quantize_weight(torch.randn(out_features, in_features, generator=gen), scheme)
    weight.channel_index = torch.tensor([0, 7, 64, 65, 130, 191])
    weight.channel_weight = torch.randn(out_features, 6, generator=gen)
    layer = QuantLinear.from_quantized(weight).to(torch.bfloat16)
    x = torch.randn(num_tokens, in_features, generator=gen).bfloat16()
    offsets = layer.offsets if layer.offsets is not None else torch.empty(0)
    codes_only = quant_ops().dequantize_bf16(layer.qweight, layer.scales, offsets, 4, in_features).float()
    dense = codes_only.clone()
    index = weight.channel_index
    dense[:, index] = layer.dequantize()[:, index].bfloat16().float()  # codes' value + float part, one rounding
    exact = x.float() @ dense.T
    bound = 2 ** -8 * exact.abs() + 1e-5 * (x.float().abs() @ dense.abs().T)
    if not native_has("quant", "amx"):  # woq_amx takes these calls where AMX runs
        assert layer.select_kernel(num_tokens, torch.bfloat16).name == "int4_dpbf16"
        assert bool(((layer(x).float() - exact).abs() <= bound).all())
    ours = layer.run_kernel(x, KERNEL_REGISTRY["int4_dpbf16"])
    assert bool(((ours.float() - exact).abs() <= bound).all())
    assert not bool(((ours.float() - x.float() @ codes_only.T).abs() <= bound).all())  # the channels count
    codes, scales, offsets, group_len, kept, columns = layer.prepare(KERNEL_REGISTRY["int4_dpbf16"], torch.bfloat16)
    with pytest.raises(RuntimeError, match="outside"):
        quant_ops().int4_linear_dpbf16(x, codes, scales, offsets, group_len, kept + in_features, columns)

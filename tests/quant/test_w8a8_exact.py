"""The native W8A8 kernels (AMX-INT8 tiles, VNNI GEMV) multiply the same per-token codes exactly and
rescale like rescale_rows."""
import pytest
import torch

from ember.kernels.linear.registry import KERNEL_REGISTRY
from ember.kernels.linear.tiles import tile_int8_codes
from ember.kernels.ops import native_has, quant_ops
from ember.quant.linear import QuantLinear
from ember.quant.rtn import WeightScheme, quantize_weight

needs_amx = pytest.mark.skipif(not native_has("quant", "amx"), reason="no AMX-INT8 on this machine")
AMX = KERNEL_REGISTRY["w8a8_amx"]
EXACT_KERNELS = ["w8a8_amx", "w8a8_gemv"]
# (N, K): 48 and 80 leave an odd 16-column block; 960 x 576 is SmolLM2's fused q/k/v, 576 x 1536 its down
SHAPES = [(48, 64), (80, 192), (960, 576), (576, 1536)]


def _exact_kernel(name, layer, dtype):
    kernel = KERNEL_REGISTRY[name]
    if not kernel.supports(layer.spec, dtype):
        pytest.skip(f"{name} cannot run here")
    return kernel


def _layer(out_features, in_features, bias):
    gen = torch.Generator().manual_seed(out_features + in_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    bias_t = torch.randn(out_features, generator=gen) if bias else None
    return QuantLinear.from_quantized(quantize_weight(weight, WeightScheme(8)), bias_t, act_bits=8)


@pytest.mark.parametrize("name", EXACT_KERNELS)
@pytest.mark.parametrize("out_features, in_features", SHAPES + [(7, 100)])
@pytest.mark.parametrize("num_tokens", [1, 2, 4, 5, 16, 17, 33, 64, 300])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("bias", [False, True])
def test_equals_int_mm_then_rescale(name, out_features, in_features, num_tokens, dtype, bias):
    # torch._int_mm sums the same int8 products in int32 and rescale_rows applies the same float32
    # operations in the same order: the outputs must agree bit for bit (K = 100 leaves a masked tail)
    layer = _layer(out_features, in_features, bias)
    kernel = _exact_kernel(name, layer, dtype)
    x = (torch.randn(num_tokens, in_features, generator=torch.Generator().manual_seed(num_tokens)) * 3).to(dtype)
    codes, x_scale = quant_ops().quantize_rows_int8(x)
    acc = torch._int_mm(codes, layer.qweight.t().contiguous())
    expected = quant_ops().rescale_rows(acc, x_scale, layer.scales.view(-1), layer.bias, dtype)
    ours = layer.run_kernel(x, kernel)
    assert ours.dtype == dtype and ours.shape == (num_tokens, out_features)
    assert torch.equal(ours, expected)


@pytest.mark.parametrize("name", EXACT_KERNELS)
def test_integer_products_are_exact_at_the_code_extremes(name):
    # all codes +-127: every product is 16129 and a K = 1536 row sums to 24.8M, exact in int32
    layer = _layer(32, 1536, False)
    kernel = _exact_kernel(name, layer, torch.float32)
    with torch.no_grad():
        layer.qweight.fill_(-127)
        layer.scales.fill_(1.0)
    x = torch.full((3, 1536), 127.0)
    out = layer.run_kernel(x, kernel)
    assert torch.equal(out, torch.full((3, 32), -127.0 * 127 * 1536))


@needs_amx
def test_tile_codes_keep_the_weight_size_and_quad_order():
    qweight = torch.arange(32 * 128, dtype=torch.int32).remainder(251).sub(125).to(torch.int8).view(32, 128)
    tiles = tile_int8_codes(qweight)
    assert tiles.shape == (2, 2, 16, 64) and tiles.numel() == qweight.numel()
    # tile (column block 1, k tile 1), row 3, column 5, byte 2 holds W[16 + 5, 64 + 4 * 3 + 2]
    assert tiles[1, 1, 3, 5 * 4 + 2] == qweight[21, 78]


@needs_amx
def test_policy_prefers_amx_for_w8a8():
    layer = _layer(48, 64, False)
    assert layer.select_kernel(1, torch.bfloat16) is AMX
    assert layer.select_kernel(512, torch.float32) is AMX
    grouped = QuantLinear.from_quantized(quantize_weight(torch.randn(48, 128), WeightScheme(8, 64)), act_bits=8)
    assert not AMX.supports(grouped.spec, torch.bfloat16)  # one scale per output channel only


def test_policy_takes_the_gemv_for_decode_without_amx():
    layer = _layer(48, 64, False)
    gemv = KERNEL_REGISTRY["w8a8_gemv"]
    if native_has("quant", "amx") or not gemv.supports(layer.spec, torch.bfloat16):
        pytest.skip("AMX-INT8 serves decode here, or no VNNI GEMV")
    assert layer.select_kernel(4, torch.bfloat16) is gemv
    assert layer.select_kernel(5, torch.bfloat16) is not gemv

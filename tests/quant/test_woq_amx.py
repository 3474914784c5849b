"""The AMX weight-only kernel dequantizes exactly as the reference and accumulates in float32."""
import pytest
import torch
import torch.nn.functional as F

from ember.kernels.linear.registry import KERNEL_REGISTRY, KernelPolicy
from ember.kernels.linear.tiles import tile_woq_codes
from ember.kernels.ops import native_has
from ember.quant.linear import QuantLinear
from ember.quant.rtn import WeightScheme, quantize_weight

pytestmark = pytest.mark.skipif(not native_has("quant", "amx"), reason="no AMX-BF16 on this machine")
WOQ = KERNEL_REGISTRY["woq_amx"]

SCHEMES = [WeightScheme(8), WeightScheme(8, 64), WeightScheme(4, 32, False), WeightScheme(4, 64, True),
           WeightScheme(4, None, False)]
# (N, K): N = 48 and 80 leave an odd 16-column block (a one-tile panel); K = 576 as in SmolLM2
SHAPES = [(48, 64), (80, 192), (96, 576)]


def _layer(scheme, out_features, in_features, bias=False):
    gen = torch.Generator().manual_seed(out_features * in_features)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    bias_t = torch.randn(out_features, generator=gen) if bias else None
    return QuantLinear.from_quantized(quantize_weight(weight, scheme), bias_t)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("out_features, in_features", SHAPES)
def test_dequantized_weight_is_bit_exact(scheme, out_features, in_features):
    # one-hot rows pick single weights: y = I W^T = W^T, with nothing to round but the weight itself
    layer = _layer(scheme, out_features, in_features)
    eye = torch.eye(in_features, dtype=torch.bfloat16)
    ours = layer.run_kernel(eye, WOQ)
    assert torch.equal(ours, layer.dequantize().to(torch.bfloat16).T)


@pytest.mark.parametrize("scheme", SCHEMES, ids=str)
@pytest.mark.parametrize("out_features, in_features", SHAPES)
# up to 64 tokens one task takes every row (1-4 row tiles, a padded last one: 5, 17, 33, 50); beyond, row
# blocks of 32 in chunks of 256 (529: 3 chunks and a tail)
@pytest.mark.parametrize("num_tokens", [1, 5, 16, 17, 32, 33, 48, 50, 64, 65, 100, 130, 529])
def test_matches_float32_matmul_of_bf16_weight(scheme, out_features, in_features, num_tokens):
    layer = _layer(scheme, out_features, in_features, bias=True)
    x = torch.randn(num_tokens, in_features, generator=torch.Generator().manual_seed(num_tokens)).bfloat16()
    weight = layer.dequantize().to(torch.bfloat16).float()
    exact = F.linear(x.float(), weight)  # [M, N]
    expected = (exact.bfloat16() + layer.bias.bfloat16()).float()  # bias added in bf16 like the other kernels
    ours = layer.run_kernel(x, WOQ)
    assert ours.dtype == torch.bfloat16 and ours.shape == (num_tokens, out_features)
    # only the float32 summation order differs (1e-5 of sum |x||w| covers it); then the sum and the
    # sum plus bias each round to bf16, where a straddled rounding boundary costs one ulp (2^-7 rel)
    magnitude = F.linear(x.float().abs(), weight.abs())
    bound = 2 ** -7 * (exact.abs() + expected.abs()) + 1e-5 * magnitude
    assert bool(((ours.float() - expected).abs() <= bound).all())


def test_tile_codes_keep_the_weight_size():
    layer = _layer(WeightScheme(4, 32, False), 48, 64)
    assert tile_woq_codes(layer.qweight, 4).numel() == layer.qweight.numel()
    layer8 = _layer(WeightScheme(8), 48, 64)
    assert tile_woq_codes(layer8.qweight, 8).numel() == layer8.qweight.numel()


@pytest.mark.parametrize("out_features, in_features, scheme", [(40, 64, WeightScheme(8)), (48, 72, WeightScheme(8)),
                                                                (48, 96, WeightScheme(4, 48, True))])
def test_unsupported_shapes_are_refused(out_features, in_features, scheme):
    layer = _layer(scheme, out_features, in_features)
    assert not WOQ.supports(layer.spec, torch.bfloat16)
    assert KernelPolicy().select(layer.spec, 256, torch.bfloat16).name == "dequant_dense"


def test_float32_activations_keep_the_dense_path():
    layer = _layer(WeightScheme(8), 48, 64)
    assert not WOQ.supports(layer.spec, torch.float32)
    assert layer.select_kernel(256, torch.float32).name == "dequant_dense"


# int8 with groups: per-channel int8 takes int8_gemv up to 4 tokens whatever the batched kernel
@pytest.mark.parametrize("scheme, packed", [(WeightScheme(8, 32), "int8_weight_only"),
                                            (WeightScheme(4, 32, False), "int4_weight_only")])
def test_policy_keeps_packed_kernels_for_few_tokens_only(scheme, packed):
    layer = _layer(scheme, 48, 64)
    limit = layer.policy.max_packed_tokens
    assert layer.select_kernel(limit, torch.bfloat16).name == packed
    assert layer.select_kernel(limit + 1, torch.bfloat16).name == "woq_amx"
    assert layer.select_kernel(1024, torch.bfloat16).name == "woq_amx"
    without = KernelPolicy(disabled={"woq_amx"})
    assert without.select(layer.spec, limit + 1, torch.bfloat16).name == packed  # the old limits without AMX


def test_disable_amx_switch(monkeypatch):
    # read when a kernel is chosen: a layer built after the switch runs what a CPU without AMX runs
    monkeypatch.setenv("EMBER_DISABLE_AMX", "1")
    assert not native_has("quant", "amx") and not native_has("core", "amx")
    assert _layer(WeightScheme(8), 48, 64).select_kernel(256, torch.bfloat16).name == "dequant_dense"
    monkeypatch.delenv("EMBER_DISABLE_AMX")
    assert native_has("quant", "amx")
    assert _layer(WeightScheme(8), 48, 64).select_kernel(256, torch.bfloat16).name == "woq_amx"

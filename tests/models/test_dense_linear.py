"""Dense linears through the kernel dispatch (oneDNN prepacked, AMX tiles, the bfloat16 GEMV) against
float32 matmuls of the same bfloat16 numbers, and the float32 reference against nn.Linear."""

import pytest
import torch
from torch import nn

from ember.kernels.linear.dense import (AMX_MAX_TOKENS, PANELS_MAX_TOKENS, PANELS_MIN_TOKENS, add_channels,
                                       onednn_bf16_available)
from ember.kernels.linear.registry import KERNEL_REGISTRY, KernelPolicy
from ember.kernels.linear.tiles import pair_panels, tile_bf16_weight
from ember.kernels.ops import core_ops, native_has
from ember.models.layers.linear import DenseLinear, use_dense_kernels

needs_onednn = pytest.mark.skipif(not onednn_bf16_available(), reason="no oneDNN bfloat16 support")


@pytest.mark.parametrize("rows", [1, 7, 300])
def test_float32_reference_equals_nn_linear(rows):
    torch.manual_seed(rows)
    linear = nn.Linear(96, 40, bias=False)
    x = torch.randn(2, rows, 96)
    layer = DenseLinear(linear, KernelPolicy(disabled=frozenset({"onednn_f32"})))
    assert layer.select_kernel(rows, torch.float32).name == "dense_reference"
    assert torch.equal(layer(x), linear(x))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch without oneDNN")
@pytest.mark.parametrize("rows", [1, 2, 5, 64, 300])
def test_float32_onednn_matches_a_float64_matmul(rows):
    torch.manual_seed(rows)
    linear = nn.Linear(576, 1536, bias=False)
    x = torch.randn(rows, 576)
    layer = DenseLinear(linear)
    assert layer.select_kernel(rows, torch.float32).name == "onednn_f32"
    exact = x.double() @ linear.weight.double().T
    # float32 sums in some order: within 1e-5 of sum |x||w| (a few ulps of the terms' scale)
    bound = 1e-5 * (x.double().abs() @ linear.weight.double().abs().T)
    assert bool(((layer(x).double() - exact).abs() <= bound).all())


@needs_onednn
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
def test_dense_linear_matches_float32(rows):
    torch.manual_seed(0)
    linear = nn.Linear(576, 1536, bias=False).to(torch.bfloat16)
    x = torch.randn(rows, 576).to(torch.bfloat16)
    expected = x.float() @ linear.weight.float().T  # exact products of the bf16 inputs
    out = DenseLinear(linear)(x)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, 1536)
    # bfloat16 output rounding only: relative error of the stored result <= 2^-8 (+ accumulation).
    torch.testing.assert_close(out.float(), expected, rtol=2 ** -7, atol=1e-2)


def test_every_linear_is_replaced_and_keeps_its_bias():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8, bias=False), nn.Sequential(nn.Linear(8, 4, bias=False)),
                          nn.Linear(4, 2, bias=True))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        expected = model(x)
    assert use_dense_kernels(model, torch.float32) == 3
    assert all(isinstance(m, DenseLinear) for m in (model[0], model[1][0], model[2]))
    with torch.inference_mode():
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("out_features, in_features", [(48, 64), (80, 192), (960, 576)])
@pytest.mark.parametrize("rows", [1, 5, 16, 17, 33, 64, 100, 256, 300])
def test_amx_tile_path_rounds_the_float32_sum_once(out_features, in_features, rows):
    # 48 and 80 columns leave an odd 16-column block; 300 rows go to oneDNN (over AMX_MAX_TOKENS)
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
    layer = DenseLinear(linear)
    if not KERNEL_REGISTRY["amx_bf16"].supports(layer.spec, torch.bfloat16):
        pytest.skip("no AMX-BF16 on this machine")
    assert (layer.select_kernel(rows, torch.bfloat16).name == "amx_bf16") == (rows <= AMX_MAX_TOKENS)
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    out = layer(x.view(1, rows, in_features))
    assert out.shape == (1, rows, out_features) and out.dtype == torch.bfloat16
    _assert_float32_sum_rounded_once(out[0], x, linear.weight)


def _assert_float32_sum_rounded_once(out, x, weight):
    """float32 sums in another order (1e-5 of sum |x||w| covers it), then one rounding to bf16 (2^-8 rel)."""
    exact = x.float() @ weight.float().T
    bound = 2 ** -8 * exact.abs() + 1e-5 * (x.float().abs() @ weight.float().abs().T)
    assert bool(((out.float() - exact).abs() <= bound).all())


def test_tile_layout_holds_vnni_pairs():
    weight = torch.arange(32 * 64, dtype=torch.float32).view(32, 64).to(torch.bfloat16)
    tiles = tile_bf16_weight(weight)
    assert tiles.shape == (2, 2, 16, 32) and tiles.numel() == weight.numel()
    # tile (column block 1, k tile 1), row 3 (k pair 3), column 5, odd k -> W[16 + 5, 32 + 2 * 3 + 1]
    assert tiles[1, 1, 3, 5 * 2 + 1] == weight[21, 39]


@pytest.mark.parametrize("out_features, in_features", [(3, 32), (100, 96), (1728, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5])
def test_gemv_path_rounds_the_float32_sum_once(out_features, in_features, rows):
    # rows 1-2 take the GEMV where there is no AMX (3-4 too with the panels disabled); 5 rows go to the
    # panels or oneDNN
    gen = torch.Generator().manual_seed(out_features + rows)
    linear = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
    layer = DenseLinear(linear, KernelPolicy(disabled=frozenset({"bf16_dpbf16"})))
    gemv = KERNEL_REGISTRY["bf16_gemv"]
    if not gemv.supports(layer.spec, torch.bfloat16) or layer.select_kernel(1, torch.bfloat16) is not gemv:
        pytest.skip("no AVX512-BF16 GEMV here (or AMX serves short calls)")
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    out = layer(x.view(1, rows, in_features))
    assert out.shape == (1, rows, out_features) and out.dtype == torch.bfloat16
    _assert_float32_sum_rounded_once(out[0], x, linear.weight)
    if rows <= core_ops().max_gemv_tokens:  # the kernel itself, not only the layer's dispatch
        assert layer.select_kernel(rows, torch.bfloat16) is gemv
        direct = core_ops().bf16_gemv(x, linear.weight.contiguous())
        assert torch.equal(direct, out[0])


@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_channel_gemv_adds_the_gathered_sum_to_out_rounded_once(rows):
    # QuantLinear's float channels at decode sizes: out += x[:, index] @ w^T in place, float32, one rounding
    if not native_has("core", "avx512_bf16"):
        pytest.skip("no AVX512-BF16 GEMV here")
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 576, generator=gen).to(torch.bfloat16)
    index = torch.cat([torch.randperm(576, generator=gen)[:57], torch.zeros(7, dtype=torch.long)])  # padded to 64
    weight = torch.randn(960, 64, generator=gen).to(torch.bfloat16)
    weight[:, 57:] = 0
    out = torch.randn(rows, 960, generator=gen).to(torch.bfloat16)
    before = out.clone()
    result = add_channels(out, x, index, weight)
    assert result.data_ptr() == out.data_ptr()  # in place
    exact = before.double() + x[:, index].double() @ weight.double().T
    bound = 2 ** -8 * exact.abs() + 1e-5 * (x[:, index].double().abs() @ weight.double().abs().T + 1)
    assert bool(((out.double() - exact).abs() <= bound).all())
    with pytest.raises(RuntimeError, match="out of range"):
        core_ops().bf16_gemv_channels_(out, x, torch.full((64,), 576, dtype=torch.long), weight)


def test_pair_panels_hold_bf16_pairs_of_k():
    weight = torch.randn(48, 8, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    words = pair_panels(weight)
    assert words.dtype == torch.int32 and words.numel() * 2 == weight.numel()
    values = words.view(torch.bfloat16)
    # a full panel of 32 channels: [pair][block][channel][k parity]; pair 3, block 1, channel 5, odd k
    assert torch.equal(values[:32 * 8].view(4, 2, 16, 2)[3, 1, 5, 1], weight[16 + 5, 7])
    # the last 16 channels: [pair][channel][k parity]; pair 2, channel 7, even k
    assert torch.equal(values[32 * 8:].view(4, 16, 2)[2, 7, 0], weight[32 + 7, 4])
    assert sorted(values.float().tolist()) == sorted(weight.float().flatten().tolist())  # a permutation


@pytest.mark.parametrize("out_features, in_features", [(48, 64), (80, 192), (960, 576), (576, 1536)])
@pytest.mark.parametrize("rows", [1, PANELS_MIN_TOKENS, 5, 11, 12, 13, 25, PANELS_MAX_TOKENS])
def test_pair_panel_path_rounds_the_float32_sum_once(out_features, in_features, rows):
    # 48 and 80 channels end in a panel of 16; 12-row blocks leave 1-11 rows over; 1 row only when forced
    gen = torch.Generator().manual_seed(out_features + rows)
    linear = nn.Linear(in_features, out_features, bias=False).to(torch.bfloat16)
    layer = DenseLinear(linear)
    panels = KERNEL_REGISTRY["bf16_dpbf16"]
    if not panels.supports(layer.spec, torch.bfloat16):
        pytest.skip("no AVX512-BF16 panels here (or AMX serves these calls)")
    assert (layer.select_kernel(rows, torch.bfloat16) is panels) == (rows >= PANELS_MIN_TOKENS)
    assert layer.select_kernel(PANELS_MAX_TOKENS + 1, torch.bfloat16) is not panels
    if rows < PANELS_MIN_TOKENS:
        layer = DenseLinear(linear, KernelPolicy(forced=("bf16_dpbf16",)))
    x = torch.randn(rows, in_features, generator=gen).to(torch.bfloat16)
    out = layer(x.view(1, rows, in_features))
    assert out.shape == (1, rows, out_features) and out.dtype == torch.bfloat16
    _assert_float32_sum_rounded_once(out[0], x, linear.weight)
    assert torch.equal(core_ops().bf16_linear_dpbf16(x, pair_panels(linear.weight), out_features), out[0])


def test_plans_are_kept_for_small_calls_only_and_large_calls_still_choose_their_kernel():
    from ember.kernels.linear.module import PLAN_CACHE_MAX_TOKENS

    torch.manual_seed(0)
    linear = nn.Linear(32, 16, bias=True)
    layer = DenseLinear(linear)
    sizes = [1, 3, PLAN_CACHE_MAX_TOKENS, PLAN_CACHE_MAX_TOKENS + 1, 700, 701, 1500]
    for rows in sizes:
        x = torch.randn(rows, 32)
        torch.testing.assert_close(layer(x), linear(x))
    assert sorted(rows for rows, _ in layer._plans) == [1, 3, PLAN_CACHE_MAX_TOKENS]
    # an uncached size takes the kernel the policy picks for it, each call
    chosen = []
    with torch.no_grad():
        layer.select_kernel = lambda num_tokens, dtype: chosen.append(num_tokens) or KERNEL_REGISTRY["dense_reference"]
        layer(torch.randn(900, 32))
        layer(torch.randn(900, 32))
        layer(torch.randn(3, 32))  # cached before the patch
    assert chosen == [900, 900]

"""Int8 KV cache: quantization error bounds, outlier residuals, and paged attention (native kernel and
reference path) over int8 blocks against naive attention on the dequantized keys and values."""

import pytest
import torch

from ember.attention.kv_quant import (dequantize, dequantize_residual, quantize_per_channel, quantize_per_token,
                                      quantize_residual, relative_error)
from ember.attention.layer_cache import Int8LayerCache, KVCacheSpec, create_layer_caches
from ember.attention.residuals import ResidualPool
from ember.attention.metadata import build_attention_metadata
from ember.attention.paged_attention import decode_attention_reference, naive_attention, paged_attention

KV_HEADS, DIM = 2, 16


def spec(cache_dtype="int8", block_size=4, residual=False, dtype=torch.float32, kv_heads=KV_HEADS, dim=DIM):
    return KVCacheSpec(cache_dtype, dtype, 1, kv_heads, dim, block_size, outlier_residual=residual)


def test_per_token_codes_round_to_nearest_with_absmax_scale():
    x = torch.randn(50, KV_HEADS, DIM, generator=torch.Generator().manual_seed(0)) * 5
    codes, scales = quantize_per_token(x)
    # The scale maps each row's largest |value| onto 127 exactly; every value is within half a step.
    torch.testing.assert_close(scales, x.abs().amax(-1) / 127)
    assert codes.abs().amax(-1).eq(127).all()
    assert ((dequantize(codes, scales, per_token=True) - x).abs() <= scales[..., None] / 2 + 1e-6).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [64, 24])
def test_native_cache_write_equals_quantize_per_token_at_the_slots(dtype, dim):
    """The int8 cache's one-call write stores what quantize_per_token + index_copy_ store, bit for bit: ties
    round to even, an all-zero row gets the smallest scale, and a slot outside the cache is refused."""
    from ember.kernels.ops import quant_ops

    if quant_ops() is None:
        pytest.skip("no native build: the PyTorch write is the one in use")
    gen = torch.Generator().manual_seed(3)
    x = (torch.randn(40, KV_HEADS, dim, generator=gen) * 3).to(dtype)
    x[0, 0] = 0.0
    x[1, 0, :3] = torch.tensor([127.0, 2.5, -3.5])  # scale 1: codes 127, 2, -4 (half to even)
    x[1, 0, 3:] = 0.0
    cache = Int8LayerCache(16, spec(block_size=4, dtype=dtype, dim=dim))
    assert cache.key.native_write is not None
    slots = torch.randperm(64, generator=gen)[:40]
    cache.key.write(x, slots)
    codes, scales = quantize_per_token(x)
    assert torch.equal(cache.key.codes.view(-1, KV_HEADS, dim)[slots], codes)
    assert torch.equal(cache.key.scales.view(-1, KV_HEADS)[slots], scales)
    assert cache.key.codes.view(-1, KV_HEADS, dim)[slots[1], 0, :3].tolist() == [127, 2, -4]
    assert cache.key.scales.view(-1, KV_HEADS)[slots[0], 0] > 0
    with pytest.raises(RuntimeError, match="outside the cache"):
        cache.key.write(x[:1], torch.tensor([64]))


def test_per_channel_codes_saturate_outside_the_calibrated_range():
    scales = torch.full((KV_HEADS, DIM), 0.01)
    x = torch.zeros(3, KV_HEADS, DIM)
    x[0, 0, 0], x[1, 1, 3], x[2, 0, 5] = 0.5, -2.0, 0.034
    codes = quantize_per_channel(x, scales)
    assert codes[0, 0, 0] == 50 and codes[1, 1, 3] == -127 and codes[2, 0, 5] == 3


def test_residual_nibbles_round_trip():
    error = torch.randn(9, KV_HEADS, DIM, generator=torch.Generator().manual_seed(1))
    packed, scales = quantize_residual(error)
    assert packed.shape == (9, KV_HEADS, DIM // 2) and packed.dtype == torch.uint8
    restored = dequantize_residual(packed, scales)
    assert ((restored - error).abs() <= scales[..., None] / 2 + 1e-6).all()
    torch.testing.assert_close(scales, error.abs().amax(-1) / 7)


def test_residual_pool_corrects_outliers_and_recycles_rows_of_rewritten_slots():
    gen = torch.Generator().manual_seed(2)
    static = torch.full((KV_HEADS, DIM), 0.02)
    rows = Int8LayerCache(8, spec("int8-static", residual=True), (static, static)).key
    pool = rows.residuals
    x = torch.randn(20, KV_HEADS, DIM, generator=gen)
    x[[3, 11]] *= 0.02  # tiny tokens: the fixed step is coarse for them, a large relative error
    slots = torch.arange(20)
    rows.write(x, slots)
    assert set((pool.index >= 0).nonzero().flatten().tolist()) >= {3, 11}
    assert pool.num_outliers == pool.num_rows_in_use and pool.num_tokens == 20
    plain = dequantize(rows.codes.view(-1, KV_HEADS, DIM)[slots], static, per_token=False)
    corrected = rows.read(torch.arange(5))[:20]
    for token in (3, 11):
        before = relative_error(x[token:token + 1], plain[token:token + 1]).item()
        after = relative_error(x[token:token + 1], corrected[token:token + 1]).item()
        assert after < before / 4, (token, before, after)
    # Rewriting slot 3 with an ordinary token releases its row.
    in_use = pool.num_rows_in_use
    rows.write(torch.randn(1, KV_HEADS, DIM, generator=gen), torch.tensor([3]))
    assert pool.index[3] == -1 and pool.num_rows_in_use == in_use - 1


def test_residual_pool_counts_outliers_it_cannot_hold():
    pool = ResidualPool(num_slots=16, num_kv_heads=KV_HEADS, head_dim=DIM, factor=0.5)  # one row
    x = torch.randn(16, KV_HEADS, DIM, generator=torch.Generator().manual_seed(3))
    approx = x + 0.1 * torch.randn(16, KV_HEADS, DIM, generator=torch.Generator().manual_seed(4))
    pool.record(x, approx, torch.arange(16))
    assert pool.num_rows_in_use == 1 and pool.num_dropped == pool.num_outliers - 1 >= 1


def _filled_cache(cache_dtype, num_blocks, block_size, kv_heads, dim, dtype, gen, residual=False):
    """An int8 cache with every slot written from random K/V (a few tokens scaled up or down as outliers),
    and the float keys/values written."""
    static = None
    if cache_dtype == "int8-static":
        scale = torch.rand(kv_heads, dim, generator=gen) * 0.01 + 0.035  # |x| <= 4.4-5.7 without clipping
        static = (scale, scale)
    cache = Int8LayerCache(num_blocks, spec(cache_dtype, block_size, residual, dtype, kv_heads, dim), static)
    num_slots = num_blocks * block_size
    k = torch.randn(num_slots, kv_heads, dim, generator=gen)
    v = torch.randn(num_slots, kv_heads, dim, generator=gen)
    k[::7] *= 0.02  # tiny keys: a large relative error under fixed steps
    v[::5] *= 4.0  # large values: clipped
    cache.write(k, v, torch.randperm(num_slots, generator=gen))
    return cache


@pytest.mark.parametrize("cache_dtype,residual", [("int8", False), ("int8-static", False), ("int8-static", True)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("block_size,head_dim,group", [(16, 64, 3), (5, 64, 1), (4, 48, 2), (7, 128, 2)])
def test_native_int8_decode_matches_naive_attention_on_dequantized_cache(cache_dtype, residual, dtype, tol,
                                                                         block_size, head_dim, group):
    from ember.kernels.ops import core_ops

    if core_ops() is None:
        pytest.skip("no native build: the reference path is the one in use")
    gen = torch.Generator().manual_seed(5)
    kv_heads, seq_lens = 3, torch.tensor([1, 15, 16, 17, 130])
    max_blocks = -(-int(seq_lens.max()) // block_size)
    num_blocks = len(seq_lens) * max_blocks
    cache = _filled_cache(cache_dtype, num_blocks, block_size, kv_heads, head_dim, dtype, gen, residual)
    if residual:
        assert cache.key.residuals.num_rows_in_use > 0 and cache.value.residuals.num_rows_in_use > 0
    tables = torch.randperm(num_blocks, generator=gen).view(len(seq_lens), max_blocks)
    q = (3 * torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=gen)).to(dtype)
    meta = build_attention_metadata(tables.tolist(), (seq_lens - 1).tolist(), [1] * len(seq_lens), block_size)
    meta.slot_mapping = torch.empty(0, dtype=torch.int64)
    out = cache.decode(q, meta, head_dim ** -0.5)
    keys, values = cache.key.read(tables), cache.value.read(tables)  # [N, S, KVH, D] float32
    for seq, length in enumerate(seq_lens.tolist()):
        expected = naive_attention(q[seq:seq + 1].float(), keys[seq, :length], values[seq, :length], head_dim ** -0.5)
        torch.testing.assert_close(out[seq].float(), expected[0], atol=tol, rtol=tol)
    reference = decode_attention_reference(q, cache, meta, head_dim ** -0.5)
    torch.testing.assert_close(out.float(), reference.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("cache_dtype", ["int8", "int8-static"])
@pytest.mark.parametrize("head_dim,group", [(64, 3), (256, 4)])
def test_native_int8_decode_of_bf16_queries_adds_no_error_beyond_the_output_rounding(cache_dtype, head_dim, group):
    """The AVX-512 kernel multiplies integer codes (the query and the softmax weights as int16 with one step
    per head and chunk): against float64 attention over the same codes, its error over 1,000 positions
    stays within 1.05x of what rounding the exact output to bfloat16 costs by itself."""
    from ember.kernels.ops import core_ops

    if core_ops() is None:
        pytest.skip("no native build: the reference path is the one in use")
    gen = torch.Generator().manual_seed(11)
    block_size, kv_heads, seq_lens = 16, 3, torch.tensor([1000, 333, 64])
    max_blocks = -(-int(seq_lens.max()) // block_size)
    num_blocks = len(seq_lens) * max_blocks
    cache = _filled_cache(cache_dtype, num_blocks, block_size, kv_heads, head_dim, torch.bfloat16, gen, False)
    tables = torch.randperm(num_blocks, generator=gen).view(len(seq_lens), max_blocks)
    q = (3 * torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=gen)).bfloat16()
    meta = build_attention_metadata(tables.tolist(), (seq_lens - 1).tolist(), [1] * len(seq_lens), block_size)
    meta.slot_mapping = torch.empty(0, dtype=torch.int64)
    out = cache.decode(q, meta, head_dim ** -0.5).double()
    keys, values = cache.key.read(tables).double(), cache.value.read(tables).double()
    for seq, length in enumerate(seq_lens.tolist()):
        k = keys[seq, :length].repeat_interleave(group, dim=1)
        v = values[seq, :length].repeat_interleave(group, dim=1)
        probs = torch.softmax(torch.einsum("hd,khd->hk", q[seq].double(), k) * head_dim ** -0.5, dim=-1)
        exact = torch.einsum("hk,khd->hd", probs, v)
        rounding = (exact.bfloat16().double() - exact).norm()
        assert (out[seq] - exact).norm() <= 1.05 * rounding


@pytest.mark.parametrize("cache_dtype", ["int8", "int8-static"])
def test_chunked_prefill_and_decode_over_int8_blocks_match_naive_attention(cache_dtype):
    """A prompt prefilled in chunks then decoded: every step, the fresh first chunk included, attends
    over the dequantized cache, which is what naive attention over dequantize(quantize(K/V)) computes."""
    gen = torch.Generator().manual_seed(6)
    heads, block_size, length = 4, 4, 23
    static = [(torch.full((KV_HEADS, DIM), 0.03), torch.full((KV_HEADS, DIM), 0.03))] if cache_dtype == "int8-static" else None
    cache = create_layer_caches(spec(cache_dtype, block_size), 8, static)[0]
    q, k, v = (torch.randn(length, h, DIM, generator=gen) for h in (heads, KV_HEADS, KV_HEADS))
    table = [6, 2, 7, 0, 5, 1]
    outs, start = [], 0
    for size in (9, 7, 1, 1, 1, 1, 1, 1, 1):  # two prefill chunks, then single-token decodes
        meta = build_attention_metadata([table], [start], [size], block_size)
        outs.append(paged_attention(q[start:start + size], k[start:start + size], v[start:start + size],
                                    cache, meta, DIM ** -0.5))
        start += size
    out = torch.cat(outs)
    keys, values = cache.read(torch.tensor(table))
    expected = naive_attention(q, keys[:length], values[:length], DIM ** -0.5)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    quantized_error = (keys[:length] - k).abs().max()
    assert 0 < quantized_error < 0.05  # the cache really holds int8 codes, not the floats


def test_bytes_per_token_counts_codes_scales_and_residual_rows():
    kw = dict(num_layers=30, num_kv_heads=3, head_dim=64, block_size=16)
    assert KVCacheSpec("auto", torch.bfloat16, **kw).bytes_per_token() == 2 * 30 * 3 * 64 * 2
    assert KVCacheSpec("auto", torch.float32, **kw).bytes_per_token() == 2 * 30 * 3 * 64 * 4
    assert KVCacheSpec("int8", torch.float32, **kw).bytes_per_token() == 2 * 30 * (3 * 64 + 3 * 4)
    assert KVCacheSpec("int8-static", torch.float32, **kw).bytes_per_token() == 2 * 30 * 3 * 64
    with_residual = KVCacheSpec("int8-static", torch.float32, outlier_residual=True, **kw).bytes_per_token()
    assert with_residual == 2 * 30 * (3 * 64 + 4 + (3 * 32 + 3 * 4) / 16)


def test_spec_rejects_residuals_without_static_scales():
    with pytest.raises(ValueError, match="int8-static"):
        spec("int8", residual=True)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        spec("fp8")
    with pytest.raises(ValueError, match="calibrated"):
        create_layer_caches(spec("int8-static"), 4)

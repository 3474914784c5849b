"""Sliding-window and soft-capped paged attention (Gemma's local layers) against naive attention, over a batch of
decode rows, a continued prefill chunk and a fresh prompt longer than the window."""

import pytest
import torch

from ember.attention.layer_cache import DenseLayerCache, Int8LayerCache, KVCacheSpec
from ember.attention.metadata import build_attention_metadata
from ember.attention.paged_attention import naive_attention, paged_attention

BLOCK = 4
HEADS, KV_HEADS, DIM = 4, 2, 8
NUM_BLOCKS = 40
# (cached rows, new rows) per sequence: three decode rows around the window's size, then two prompts
LENGTHS = [(2, 1), (9, 1), (22, 1), (13, 6), (0, 11)]


def _setup(gen: torch.Generator, cache_dtype: str = "auto"):
    """Sequences with scattered block tables, their full q/k/v, the cache (dense or int8) holding their
    context, and the step's new q/k/v."""
    blocks = torch.randperm(NUM_BLOCKS, generator=gen).tolist()
    tables, full = [], []
    for ctx, new in LENGTHS:
        num = -(-(ctx + new) // BLOCK)
        tables.append([blocks.pop() for _ in range(num)])
        full.append([torch.randn(ctx + new, h, DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS)])
    spec = KVCacheSpec(cache_dtype, torch.float32, 1, KV_HEADS, DIM, BLOCK)
    cache = DenseLayerCache(NUM_BLOCKS, spec) if cache_dtype == "auto" else Int8LayerCache(NUM_BLOCKS, spec)
    for table, (ctx, _), (_, k, v) in zip(tables, LENGTHS, full):
        slots = torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in range(ctx)], dtype=torch.int64)
        cache.write(k[:ctx], v[:ctx], slots)
    new = [torch.cat([f[i][ctx:] for f, (ctx, _) in zip(full, LENGTHS)]) for i in range(3)]
    return tables, full, cache, new


def _metadata(tables):
    return build_attention_metadata(tables, [ctx for ctx, _ in LENGTHS], [n for _, n in LENGTHS], BLOCK)


@pytest.mark.parametrize("window", [None, 1, 5, 8, 64])  # 64: longer than every sequence
@pytest.mark.parametrize("softcap", [None, 2.0])
@pytest.mark.parametrize("cache_dtype", ["auto", "int8"])
def test_windowed_batch_matches_naive_attention(window, softcap, cache_dtype):
    tables, full, cache, (q, k, v) = _setup(torch.Generator().manual_seed(0), cache_dtype)
    out = paged_attention(q, k, v, cache, _metadata(tables), DIM ** -0.5, window, softcap)
    expected = []
    for table, (f_q, _, _), (ctx, new) in zip(tables, full, LENGTHS):
        # the keys and values as the cache holds them (an int8 cache's dequantized codes)
        keys, values = (rows[:ctx + new] for rows in cache.read(torch.tensor(table)))
        expected.append(naive_attention(f_q, keys, values, DIM ** -0.5, window, softcap)[ctx:])
    expected = torch.cat(expected)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_window_reads_no_block_before_it():
    """Blocks that every query of a step has left behind may hold anything (another request's KV, once such
    blocks are freed): the output does not change."""
    window = 5
    tables, _, cache, (q, k, v) = _setup(torch.Generator().manual_seed(1))
    before = paged_attention(q, k, v, cache, _metadata(tables), DIM ** -0.5, window)
    # Decode rows are batched: their first read block is that of the row whose window starts earliest.
    num_decode = sum(1 for _, n in LENGTHS if n == 1)
    first_decode_row = min(ctx + 1 for ctx, _ in LENGTHS[:num_decode]) - window
    stale = []
    for row, (table, (ctx, _)) in enumerate(zip(tables, LENGTHS)):
        first_row = first_decode_row if row < num_decode else ctx - window + 1
        stale += table[:max(first_row, 0) // BLOCK]
    assert stale, "the layout must leave some block behind the window"
    noise = torch.Generator().manual_seed(2)
    cache.key[stale] = torch.randn(cache.key[stale].shape, generator=noise) * 100
    cache.value[stale] = torch.randn(cache.value[stale].shape, generator=noise) * 100
    after = paged_attention(q, k, v, cache, _metadata(tables), DIM ** -0.5, window)
    torch.testing.assert_close(after, before, atol=0, rtol=0)

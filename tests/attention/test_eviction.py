"""Eviction policies pick the rows the papers keep; the attention-mass recorder reproduces attention; the
compaction moves rows (codes, scales and residuals included) and frees nothing it keeps."""

import pytest
import torch

from ember.attention.eviction import (SNAPKV_WINDOW, AttentionMassRecorder, EvictionConfig, EvictionState,
                                      compact_caches)
from ember.attention.layer_cache import DenseLayerCache, Int8LayerCache, KVCacheSpec
from ember.attention.metadata import build_attention_metadata
from ember.attention.paged_attention import paged_attention


def test_streaming_keeps_sinks_and_the_recent_window():
    state = EvictionState(EvictionConfig("streaming", budget_tokens=40, sink_tokens=4, slack=8))
    assert state.select(40) is None
    assert state.select(41).tolist() == [0, 1, 2, 3] + list(range(13, 41))  # 32 rows = budget - slack


def test_recent_window_without_sinks():
    state = EvictionState(EvictionConfig("streaming", budget_tokens=40, sink_tokens=0, slack=8))
    assert state.select(50).tolist() == list(range(18, 50))


def test_h2o_adds_the_heaviest_middle_rows_and_realigns_its_scores():
    state = EvictionState(EvictionConfig("h2o", budget_tokens=40, sink_tokens=4, slack=8))
    mass = torch.zeros(3, 45)
    mass[0, [7, 20, 30]] = torch.tensor([5.0, 9.0, 7.0])  # heavy hitters
    mass[1, [2, 11]] = torch.tensor([50.0, 1.0])  # a sink's mass does not take a heavy slot
    mass[2, list(range(4, 45))] = 0.01 * torch.arange(41.0)  # a weak ramp
    state.observe(mass)
    kept = state.select(45)
    # 4 sinks, 14 recent (half of the 28 non-sink rows), 14 heavy from rows 4..30.
    assert kept[:4].tolist() == [0, 1, 2, 3] and kept[-14:].tolist() == list(range(31, 45))
    heavy = kept[4:-14].tolist()
    assert {7, 11, 20, 30} <= set(heavy) and len(heavy) == 14
    state.compact(kept)
    assert state.mass.shape == (32,)
    torch.testing.assert_close(state.mass, mass.sum(0)[kept])


def test_snapkv_keeps_what_the_observation_window_attends_to_and_its_neighbours():
    config = EvictionConfig("snapkv", budget_tokens=80, sink_tokens=0, slack=8)
    state = EvictionState(config)
    num_rows = 100
    window = torch.zeros(SNAPKV_WINDOW, num_rows)
    window[:, 40] = 1.0  # every observation query attends to row 40
    window[:5, 10] = 0.5  # a few to row 10
    state.observe(torch.zeros(10, num_rows))  # older queries fall out of the window
    state.observe(window)
    kept = state.select(num_rows).tolist()
    assert len(kept) == config.target and kept[-SNAPKV_WINDOW:] == list(range(100 - SNAPKV_WINDOW, 100))
    # Pooling over 7 rows keeps row 40's neighbourhood (37..43) and row 10's.
    assert set(range(37, 44)) <= set(kept) and 10 in kept


def test_recorded_mass_is_the_attention_each_row_received():
    """With one query head per KV head, mass @ V must reproduce the attention output itself."""
    gen = torch.Generator().manual_seed(31)
    spec = KVCacheSpec("auto", torch.float32, 1, 2, 8, 4)
    cache = DenseLayerCache(16, spec)
    tables = [[3, 1, 7, 0], [5, 9, 2]]
    lengths = [(13, 1), (4, 6)]  # a decode row over 13 cached rows, a chunk of 6 after 4
    for table, (ctx, _) in zip(tables, lengths):
        meta = build_attention_metadata([table], [0], [ctx], 4)
        k = torch.randn(ctx, 2, 8, generator=gen)
        paged_attention(torch.randn(ctx, 2, 8, generator=gen), k, torch.randn_like(k), cache, meta, 0.3)
    meta = build_attention_metadata(tables, [13, 4], [1, 6], 4)
    meta.attention_mass = AttentionMassRecorder([1, 6], [14, 10])
    q, k, v = (torch.randn(7, 2, 8, generator=gen) for _ in range(3))
    out = paged_attention(q, k, v, cache, meta, 0.3)
    solo = AttentionMassRecorder([1, 6], [14, 10])  # query head 0 over KV head 0 alone
    solo.record(q[:, :1], _OneHead(cache), meta, 0.3)
    for seq, (table, (ctx, n), start) in enumerate(zip(tables, lengths, (0, 1))):
        mass = meta.attention_mass.mass[seq]  # [n, ctx + n], summed over the 2 heads
        assert mass.shape == (n, ctx + n)
        torch.testing.assert_close(mass.sum(-1), torch.full((n,), 2.0))
        values = cache.read(torch.tensor(table))[1][:ctx + n]  # [S, 2, 8]
        expected = torch.einsum("qk,kd->qd", solo.mass[seq], values[:, 0])
        torch.testing.assert_close(expected, out[start:start + n, 0], atol=1e-5, rtol=1e-5)


class _OneHead:
    """A view of a cache's first KV head."""

    def __init__(self, cache):
        self.cache = cache

    def read(self, table):
        keys, values = self.cache.read(table)
        return keys[:, :1], values[:, :1]


@pytest.mark.parametrize("kind", ["dense", "int8", "int8-static-residual"])
def test_compaction_moves_kept_rows_to_the_front(kind):
    gen = torch.Generator().manual_seed(32)
    spec = KVCacheSpec("int8-static" if "static" in kind else ("auto" if kind == "dense" else "int8"), torch.float32,
                       1, 2, 8, 4, outlier_residual="residual" in kind)
    if kind == "dense":
        cache = DenseLayerCache(8, spec)
    else:
        static = (torch.full((2, 8), 0.02), torch.full((2, 8), 0.02)) if "static" in kind else None
        cache = Int8LayerCache(8, spec, static)
    table = [6, 2, 5, 0]
    k = torch.randn(14, 2, 8, generator=gen)
    k[[2, 9]] *= 0.01  # outliers under static scales: they get residuals
    cache.write(k, torch.randn_like(k), torch.tensor([table[r // 4] * 4 + r % 4 for r in range(14)]))
    before = cache.read(torch.tensor(table))
    kept = torch.tensor([0, 2, 5, 9, 10, 13])
    compact_caches([cache], table, kept, 14)
    after = cache.read(torch.tensor(table))
    for b, a in zip(before, after):
        torch.testing.assert_close(a[:6], b[kept])
    if "residual" in kind:
        pool = cache.key.residuals
        assert pool.num_rows_in_use == int((pool.index >= 0).sum())  # no row leaked or shared

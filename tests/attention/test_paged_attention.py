"""Paged attention over a mixed decode + prefill batch against naive full attention."""

import pytest
import torch

from ember.attention.layer_cache import DenseLayerCache, KVCacheSpec
from ember.attention.metadata import AttentionMetadata, PrefillChunk
from ember.attention.paged_attention import naive_attention, paged_attention

BLOCK = 4
HEADS, KV_HEADS, DIM = 6, 2, 8


def test_mixed_batch_matches_naive_attention():
    gen = torch.Generator().manual_seed(0)
    num_blocks = 32
    k_cache = torch.zeros(num_blocks, BLOCK, KV_HEADS, DIM)
    v_cache = torch.zeros_like(k_cache)
    # Three sequences: a decode (10 cached + 1 new), a continued prefill chunk (5 cached + 7 new)
    # and a fresh prompt (9 new). Their blocks are scattered on purpose.
    tables = {"dec": [7, 3, 12], "chunk": [5, 20, 1, 9], "fresh": [30, 2, 18]}
    lengths = {"dec": (10, 1), "chunk": (5, 7), "fresh": (0, 9)}
    full = {name: [torch.randn(ctx + new, h, DIM, generator=gen) for h in (HEADS, KV_HEADS, KV_HEADS)]
            for name, (ctx, new) in lengths.items()}
    for name in ("dec", "chunk"):  # put the already-computed context in the cache
        ctx = lengths[name][0]
        slots = _slots(tables[name], range(ctx))
        k_cache.view(-1, KV_HEADS, DIM)[slots] = full[name][1][:ctx]
        v_cache.view(-1, KV_HEADS, DIM)[slots] = full[name][2][:ctx]
    order = ["dec", "chunk", "fresh"]
    q = torch.cat([full[n][0][lengths[n][0]:] for n in order])
    k = torch.cat([full[n][1][lengths[n][0]:] for n in order])
    v = torch.cat([full[n][2][lengths[n][0]:] for n in order])
    slots = torch.cat([_slots(tables[n], range(lengths[n][0], sum(lengths[n]))) for n in order])
    chunk_mask = torch.ones(7, 12, dtype=torch.bool).tril(5)
    meta = AttentionMetadata(
        slot_mapping=slots, num_decode_tokens=1,
        decode_block_tables=torch.tensor([tables["dec"]]), decode_seq_lens=torch.tensor([11]),
        prefills=[PrefillChunk(1, 7, 5, torch.tensor(tables["chunk"]), chunk_mask),
                  PrefillChunk(8, 9, 0, torch.tensor(tables["fresh"]), None)])
    cache = DenseLayerCache(num_blocks, KVCacheSpec("auto", torch.float32, 1, KV_HEADS, DIM, BLOCK))
    cache.key, cache.value = k_cache, v_cache
    out = paged_attention(q, k, v, cache, meta, scale=DIM ** -0.5)
    expected = torch.cat([naive_attention(*full[n], scale=DIM ** -0.5)[lengths[n][0]:] for n in order])
    assert out.shape == (17, HEADS, DIM)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    # The new keys landed in their slots.
    torch.testing.assert_close(k_cache.view(-1, KV_HEADS, DIM)[slots], k)


def _slots(table, positions):
    return torch.tensor([table[p // BLOCK] * BLOCK + p % BLOCK for p in positions], dtype=torch.int64)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_native_decode_kernel_matches_reference(dtype, tol):
    from ember.kernels.ops import core_ops
    from ember.attention.paged_attention import decode_attention_reference

    ops = core_ops()
    if ops is None:
        pytest.skip("no C++ compiler: the reference path is the one in use")
    gen = torch.Generator().manual_seed(1)
    num_blocks, num_seqs = 40, 7
    k_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, BLOCK, KV_HEADS, DIM, generator=gen).to(dtype)
    seq_lens = torch.tensor([1, 4, 5, 17, 30, 2, 33])
    tables = torch.stack([torch.randperm(num_blocks, generator=gen)[:9] for _ in range(num_seqs)])
    q = torch.randn(num_seqs, HEADS, DIM, generator=gen).to(dtype)
    meta = AttentionMetadata(slot_mapping=torch.empty(0, dtype=torch.int64), num_decode_tokens=num_seqs,
                             decode_block_tables=tables, decode_seq_lens=seq_lens, prefills=[])
    cache = DenseLayerCache(num_blocks, KVCacheSpec("auto", dtype, 1, KV_HEADS, DIM, BLOCK))
    cache.key, cache.value = k_cache, v_cache
    expected = decode_attention_reference(q, cache, meta, DIM ** -0.5)
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, DIM ** -0.5)
    torch.testing.assert_close(out.float(), expected.float(), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("group", [1, 3, 9])
@pytest.mark.parametrize("block_size,head_dim", [(16, 64), (5, 64), (16, 48)])
def test_native_decode_kernel_matches_naive_attention(dtype, tol, group, block_size, head_dim):
    """Model-sized heads (the vectorized bfloat16 path): whole and partial 16-token chunks, a block
    size that chunks straddle, an odd number of 16-wide vectors per head, and NaN in every slot past
    a sequence's end (a reused or never-written block) that must not leak into the result."""
    from ember.kernels.ops import core_ops

    ops = core_ops()
    if ops is None:
        pytest.skip("no C++ compiler: the reference path is the one in use")
    gen = torch.Generator().manual_seed(2)
    kv_heads = 3
    seq_lens = torch.tensor([1, 15, 16, 17, 333])
    max_blocks = -(-int(seq_lens.max()) // block_size)
    shape = (len(seq_lens) * max_blocks, block_size, kv_heads, head_dim)
    k_cache = torch.randn(shape, generator=gen)
    v_cache = torch.randn(shape, generator=gen)
    tables = torch.randperm(shape[0], generator=gen).view(len(seq_lens), max_blocks)
    for seq, length in enumerate(seq_lens.tolist()):
        for cache in (k_cache, v_cache):
            rows = cache[tables[seq]].flatten(0, 1)  # a copy (advanced indexing): written back below
            rows[length:] = float("nan")
            cache[tables[seq]] = rows.view(max_blocks, block_size, kv_heads, head_dim)
    q = 3 * torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=gen)  # a wide score spread
    q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    scale = head_dim ** -0.5
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale)
    for seq, length in enumerate(seq_lens.tolist()):
        k = k_cache[tables[seq]].flatten(0, 1)[:length].float()
        v = v_cache[tables[seq]].flatten(0, 1)[:length].float()
        expected = naive_attention(q[seq : seq + 1].float(), k, v, scale)[0]
        torch.testing.assert_close(out[seq].float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("group,block_size,head_dim", [(3, 16, 64), (9, 16, 64), (4, 5, 48), (8, 16, 128)])
def test_native_decode_kernel_serves_verification_rows_bit_for_bit(group, block_size, head_dim):
    """Rows that verify one sequence's drafts (consecutive rows whose lengths go up by one over the same
    blocks) are served together, each chunk's K/V widened once for all of them: the output is bit for bit
    what each row gives alone, and naive attention's within bf16 rounding. Spans of 2, 5 and 11 rows (more
    than one piece holds), one that crosses a 16-position chunk, single rows between them, a row that
    continues a span's lengths over other blocks, and NaN past every sequence's end."""
    from ember.kernels.ops import core_ops

    ops = core_ops()
    if ops is None:
        pytest.skip("no C++ compiler: the reference path is the one in use")
    gen = torch.Generator().manual_seed(3)
    kv_heads = 2
    # (first row's length, rows) per sequence, in step order
    sequences = [(40, 5), (17, 1), (15, 2), (70, 11), (81, 1), (9, 1)]
    max_len = max(first + rows - 1 for first, rows in sequences)
    max_blocks = -(-max_len // block_size)
    num_blocks = len(sequences) * max_blocks
    k_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_blocks, block_size, kv_heads, head_dim, generator=gen)
    seq_tables = torch.randperm(num_blocks, generator=gen).view(len(sequences), max_blocks)
    tables, seq_lens = [], []
    for seq, (first, rows) in enumerate(sequences):
        longest = first + rows - 1
        for cache in (k_cache, v_cache):  # nothing past the sequence's last verified position is valid
            flat = cache[seq_tables[seq]].flatten(0, 1)
            flat[longest:] = float("nan")
            cache[seq_tables[seq]] = flat.view(max_blocks, block_size, kv_heads, head_dim)
        tables += [seq_tables[seq]] * rows
        seq_lens += range(first, first + rows)
    tables, seq_lens = torch.stack(tables), torch.tensor(seq_lens)
    assert seq_lens[19] == seq_lens[18] + 1  # the row after the 11-row span continues it over other blocks
    q = 3 * torch.randn(len(seq_lens), kv_heads * group, head_dim, generator=gen)
    q, k_cache, v_cache = q.bfloat16(), k_cache.bfloat16(), v_cache.bfloat16()
    scale = head_dim ** -0.5
    out = ops.paged_decode_attention(q, k_cache, v_cache, tables, seq_lens, scale)
    alone = torch.cat([ops.paged_decode_attention(q[i : i + 1], k_cache, v_cache, tables[i : i + 1],
                                                  seq_lens[i : i + 1], scale) for i in range(len(seq_lens))])
    assert torch.equal(out, alone)
    for row, length in enumerate(seq_lens.tolist()):
        k = k_cache[tables[row]].flatten(0, 1)[:length].float()
        v = v_cache[tables[row]].flatten(0, 1)[:length].float()
        expected = naive_attention(q[row : row + 1].float(), k, v, scale)[0]
        torch.testing.assert_close(out[row].float(), expected, atol=2e-2, rtol=2e-2)

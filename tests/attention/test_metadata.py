"""build_attention_metadata against metadata spelled out by hand for a mixed decode + prefill step."""

import pytest
import torch

from ember.attention.metadata import build_attention_metadata

BLOCK = 4


def _slots(table, positions):
    return [table[p // BLOCK] * BLOCK + p % BLOCK for p in positions]


def test_mixed_step_metadata():
    # Two decodes (10 and 3 cached), a continued chunk (5 cached + 7 new), a fresh prompt of 9.
    tables = [[7, 3, 12], [4], [5, 20, 1, 9], [30, 2, 18]]
    context_lens, query_lens = [10, 3, 5, 0], [1, 1, 7, 9]
    meta = build_attention_metadata(tables, context_lens, query_lens, BLOCK)
    expected_slots = [s for t, c, q in zip(tables, context_lens, query_lens) for s in _slots(t, range(c, c + q))]
    assert meta.slot_mapping.tolist() == expected_slots
    assert meta.num_decode_tokens == 2
    assert meta.decode_block_tables.tolist() == [[7, 3, 12, 0], [4, 0, 0, 0]]
    assert meta.decode_seq_lens.tolist() == [11, 4]
    chunk, fresh = meta.prefills
    assert (chunk.query_start, chunk.query_len, chunk.context_len) == (2, 7, 5)
    assert (fresh.query_start, fresh.query_len, fresh.context_len) == (9, 9, 0)
    assert chunk.block_table.tolist() == [5, 20, 1, 9] and fresh.block_table.tolist() == [30, 2, 18]
    assert torch.equal(chunk.mask, torch.ones(7, 12, dtype=torch.bool).tril(5))
    assert fresh.mask is None


def test_given_positions_match_derived_ones():
    tables, context_lens, query_lens = [[1, 2], [3, 4, 5]], [6, 2], [1, 9]
    positions = torch.tensor([6, *range(2, 11)])
    derived = build_attention_metadata(tables, context_lens, query_lens, BLOCK)
    given = build_attention_metadata(tables, context_lens, query_lens, BLOCK, positions)
    assert torch.equal(derived.slot_mapping, given.slot_mapping)


def test_prefill_only_step_has_no_decode_rows():
    meta = build_attention_metadata([[0, 1, 2]], [0], [10], BLOCK)
    assert meta.slot_mapping.tolist() == list(range(10))
    assert meta.num_decode_tokens == 0 and meta.decode_block_tables is None and meta.decode_seq_lens is None
    assert len(meta.prefills) == 1 and meta.prefills[0].mask is None


def test_mismatched_lengths_are_rejected():
    with pytest.raises(ValueError):
        build_attention_metadata([[0]], [0, 1], [1], BLOCK)

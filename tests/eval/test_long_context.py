"""Long-document perplexity under eviction: without eviction it is the one-pass perplexity; with it,
blocks stay within the budget plus one chunk."""

import pytest
import torch

from ember.attention.eviction import EvictionConfig
from ember.eval.long_context import long_context_perplexity
from ember.eval.perplexity import perplexity
from ember.loader.model_loader import load_model


@pytest.fixture(scope="module")
def tiny_model(tiny_llama_dir):
    return load_model(tiny_llama_dir, torch.float32)[0]


def test_without_eviction_it_is_the_one_pass_perplexity(tiny_model):
    ids = torch.randint(3, 512, (200,), generator=torch.Generator().manual_seed(41)).tolist()
    chunked = long_context_perplexity(tiny_model, ids, None, chunk_size=32)
    whole = perplexity(tiny_model, ids, window=200, stride=200)
    assert chunked.num_tokens == whole.num_tokens == 199
    assert chunked.perplexity == pytest.approx(whole.perplexity, rel=1e-5)
    assert chunked.max_rows == 200 and chunked.max_blocks == 13


@pytest.mark.parametrize("policy", ["streaming", "h2o", "snapkv"])
def test_eviction_bounds_the_blocks_and_changes_the_result(tiny_model, policy):
    ids = torch.randint(3, 512, (240,), generator=torch.Generator().manual_seed(42)).tolist()
    config = EvictionConfig(policy, budget_tokens=96, sink_tokens=4, slack=16)
    result = long_context_perplexity(tiny_model, ids, config, chunk_size=32)
    full = long_context_perplexity(tiny_model, ids, None, chunk_size=32)
    assert result.max_rows <= 96 + 32 and result.max_blocks == -(-(96 + 32) // 16)
    assert result.perplexity != full.perplexity
    assert result.perplexity == pytest.approx(full.perplexity, rel=0.05)  # a random model barely cares

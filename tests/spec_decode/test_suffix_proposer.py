"""Suffix decoding's bookkeeping: trees kept up to date step by step give the drafts of trees built at once
from the same tokens, a finished request's output drafts for the next one, and preemption restarts cleanly."""

import random

import pytest

from ember.request import Request
from ember.sampling_params import SamplingParams
from ember.spec_decode.config import SpeculativeConfig

suffix_decoding = pytest.importorskip("arctic_inference.suffix_decoding")
from ember.spec_decode.suffix_proposer import SuffixProposer  # noqa: E402

DEPTH = 24


def _request(request_id, prompt):
    return Request(request_id, prompt, SamplingParams(max_tokens=512))


def _proposer(max_cached_requests=100):
    return SuffixProposer(DEPTH, max_cached_requests, max_spec_factor=1.0, min_token_prob=0.1)


def _built_at_once(request, k):
    """The draft of a fresh library cache given the request's prompt and whole output in one call."""
    cache = suffix_decoding.SuffixDecodingCache(max_tree_depth=DEPTH, max_cached_requests=100)
    cache.start_request("r", request.prompt_token_ids)
    if request.output_token_ids:
        cache.add_active_response("r", request.output_token_ids)
    return cache.speculate("r", request.all_token_ids[-DEPTH:], max_spec_tokens=k, max_spec_factor=1.0,
                           min_token_prob=0.1).token_ids


def test_drafts_step_by_step_equal_trees_built_at_once_through_a_preemption():
    rng = random.Random(0)
    chunk = [rng.randint(3, 500) for _ in range(12)]
    request = _request("a", [rng.randint(3, 500) for _ in range(5)] + chunk * 2 + chunk[:3])
    proposer, drafted = _proposer(), 0
    for step in range(40):
        running = [] if step in (17, 18) else [request]  # preempted for two steps
        drafts = proposer.propose(running, running, [4] * len(running))
        if running:
            assert drafts == [_built_at_once(request, 4)]
            drafted += len(drafts[0])
        # the "model" goes on repeating the chunk, but for two tokens of its own
        request.append_output_token_id(rng.randint(501, 900) if step in (10, 25) else chunk[(3 + step) % 12])
    assert drafted > 60  # the chunk was found, and found again after each departure from it


def test_a_finished_request_s_output_drafts_for_the_next_one_unless_nothing_is_cached():
    rng = random.Random(1)
    output = [rng.randint(3, 500) for _ in range(30)]
    for cached, expected in [(100, output[15:19]), (0, [])]:
        proposer = _proposer(cached)
        first = _request("first", [rng.randint(3, 500) for _ in range(8)])
        proposer.propose([first], [], [])
        for token in output:
            first.append_output_token_id(token)
            proposer.propose([first], [], [])
        second = _request("second", [rng.randint(501, 900) for _ in range(6)] + output[7:15])
        assert proposer.propose([second], [second], [4]) == [expected]  # "first" left: stopped, output kept
        assert set(proposer.cache.active_requests) == {"second"}


def test_config_defaults_follow_vllm_and_bad_values_are_refused():
    config = SpeculativeConfig.parse('{"method": "suffix"}')
    assert config.num_speculative_tokens == config.suffix_decoding_max_tree_depth == 24
    assert config.suffix_decoding_max_cached_requests == 10000 and config.suffix_decoding_min_token_prob == 0.1
    assert SpeculativeConfig.parse('{"method": "ngram"}').num_speculative_tokens == 4
    for bad, message in [('{"method": "suffix", "suffix_decoding_max_tree_depth": 0}', "max_tree_depth"),
                         ('{"method": "suffix", "suffix_decoding_max_cached_requests": -1}', "max_cached_requests"),
                         ('{"method": "suffix", "suffix_decoding_max_spec_factor": 0}', "max_spec_factor"),
                         ('{"method": "suffix", "suffix_decoding_min_token_prob": 2}', "min_token_prob")]:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.parse(bad)


def test_a_batch_over_disable_by_batch_size_drafts_nothing_but_keeps_its_trees():
    from ember.spec_decode.speculator import Speculator

    config = SpeculativeConfig.parse({"method": "suffix", "disable_by_batch_size": 1})
    speculator = Speculator(config, None, max_model_len=256)
    requests = [_request(name, [5, 6, 7, 5, 6, 7, 5, 6]) for name in "ab"]
    for request in requests:
        request.num_computed_tokens = request.num_tokens - 1  # decoding: one token to compute
    speculator.propose(requests)
    assert all(r.spec_token_ids == [] for r in requests)  # two running, the limit is one
    assert set(speculator.suffix.cache.active_requests) == {"a", "b"}  # trees kept, not churned
    speculator.propose(requests[:1])
    drafts = requests[0].spec_token_ids
    assert drafts and drafts == _built_at_once(requests[0], 24)  # alone: drafts; "b" left and was stopped
    assert set(speculator.suffix.cache.active_requests) == {"a"}

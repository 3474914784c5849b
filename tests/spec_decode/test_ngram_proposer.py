"""Prompt lookup: the longest suffix first, its first earlier occurrence, at most k tokens."""

import pytest

from ember.spec_decode.config import SpeculativeConfig
from ember.spec_decode.ngram_proposer import NgramProposer


def test_longest_suffix_wins_and_its_first_occurrence_is_used():
    proposer = NgramProposer(2, 4)
    # Suffix [7, 8, 9] occurs at 0 (followed by 1, 2) and the 2-gram [8, 9] also at 10 (followed by 5).
    tokens = [7, 8, 9, 1, 2, 3, 4, 0, 0, 0, 8, 9, 5, 6, 7, 8, 9]
    assert proposer.propose(tokens, 3) == [1, 2, 3]
    assert proposer.propose(tokens, 1) == [1]


def test_shorter_suffix_when_the_longer_never_occurred():
    proposer = NgramProposer(2, 4)
    tokens = [5, 8, 9, 6, 1, 2, 3, 8, 9]
    assert proposer.propose(tokens, 4) == [6, 1, 2, 3]


def test_no_match_no_draft_and_the_suffix_itself_is_not_a_match():
    proposer = NgramProposer(2, 3)
    assert proposer.propose([1, 2, 3, 4, 5], 4) == []
    assert proposer.propose([1, 2], 4) == []
    # [3, 3] matches at 1 (followed by 3) while overlapping the suffix; the draft stops at the end.
    assert proposer.propose([1, 3, 3, 3], 4) == [3]


def test_config_parses_json_and_refuses_bad_values():
    config = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 3}')
    assert config.num_speculative_tokens == 3 and config.prompt_lookup_max == 4
    assert SpeculativeConfig.parse(config) is config and SpeculativeConfig.parse(None) is None
    for bad, message in [("{", "not valid JSON"), ("[1]", "JSON object"), ('{"method": "eagle"}', "method"),
                         ('{"method": "ngram", "num_speculative_tokens": 0}', "positive"),
                         ('{"method": "ngram", "prompt_lookup_min": 5}', "prompt_lookup"),
                         ('{"method": "draft_model"}', "needs \\\"model\\\""),
                         ('{"method": "ngram", "foo": 1}', "unknown speculative_config keys"),
                         ('{"num_speculative_tokens": 2}', "needs \\\"method\\\"")]:
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.parse(bad)

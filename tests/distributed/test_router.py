"""The prefix-aware router alone: longest cached prefix first, then the least loaded; no model needed."""

import pytest

from ember.distributed.block_keys import block_keys
from ember.distributed.router import PrefixRouter


def _keys(tokens, block_size=4):
    return block_keys(tokens, block_size)


def test_block_keys_chain_over_the_prefix_and_salt():
    a = _keys(list(range(12)))
    b = _keys(list(range(8)) + [99, 9, 10, 11])
    assert len(a) == 3 and a[:2] == b[:2] and a[2] != b[2]
    assert _keys(list(range(5))) == a[:1]  # only full blocks
    assert block_keys(list(range(8)), 4, salt="tenant") != _keys(list(range(8)))
    # the same block content at another position is another key: keys name the whole prefix
    assert _keys([0, 1, 2, 3, 0, 1, 2, 3])[1] != _keys([0, 1, 2, 3])[0]


def test_prefix_policy_prefers_the_longest_match_then_the_least_loaded():
    router = PrefixRouter(3, "prefix")
    system = list(range(100, 116))  # four blocks of a shared system prompt
    router.record(2, _keys(system + [1, 2, 3, 4]))
    router.record(1, _keys(system[:8]))
    assert router.pick(_keys(system + [7, 7, 7, 7]), [0, 0, 5]) == 2  # 4 blocks beat 2, though busier
    assert router.match_length(1, _keys(system)) == 2
    # no match anywhere: the least loaded
    assert router.pick(_keys([9] * 16), [3, 1, 2]) == 1
    # a replica that is down is never picked, even with the best match
    assert router.pick(_keys(system), [0, 0, None]) == 1  # replica 1 still has the first two blocks


def test_a_match_on_a_much_busier_replica_gives_way_to_balance():
    router = PrefixRouter(2, "prefix", balance_threshold=4)
    prompt = _keys(list(range(32)))
    router.record(0, prompt)
    assert router.pick(prompt, [3, 0]) == 0
    assert router.pick(prompt, [4, 0]) == 1


def test_round_robin_and_forget():
    router = PrefixRouter(2, "round_robin")
    router.record(0, _keys(list(range(8))))
    picks = [router.pick(_keys(list(range(8))), [0, 0]) for _ in range(4)]
    assert sorted(picks) == [0, 0, 1, 1]
    prefix = PrefixRouter(2, "prefix")
    prefix.record(1, _keys(list(range(8))))
    prefix.forget(1)
    assert prefix.match_length(1, _keys(list(range(8)))) == 0


def test_keys_are_bounded_per_replica():
    router = PrefixRouter(1, "prefix", max_keys=3)
    router.record(0, _keys(list(range(20))))  # five blocks: the oldest two are dropped
    assert router.match_length(0, _keys(list(range(20)))) == 0
    assert len(router._keys[0]) == 3


def test_no_live_replica_is_an_error():
    with pytest.raises(RuntimeError, match="no engine replica is alive"):
        PrefixRouter(2).pick([], [None, None])

"""Which replica gets a request: the one holding the longest cached prefix of its prompt, else the least
loaded (SGLang's cache-aware routing, with the router's own record of what it sent where)."""

from __future__ import annotations

import itertools
from collections import OrderedDict

from ember.distributed.block_keys import BlockKey


class PrefixRouter:
    """Keeps, per replica, the block keys of the prompts it routed there (LRU, bounded) as a stand-in for
    that replica's prefix cache, and routes by them.

    Policies: "prefix" (longest match of leading block keys; ties and no match go to the least loaded,
    and a match is ignored when its replica is `balance_threshold` requests busier than the least loaded),
    "least_loaded", "round_robin".

    Args:
        num_replicas: replicas, addressed 0..num_replicas-1.
        max_keys: block keys remembered per replica (about its prefix cache's size in blocks).
    """

    def __init__(self, num_replicas: int, policy: str = "prefix", max_keys: int = 65536,
                 balance_threshold: int = 16) -> None:
        self.policy = policy
        self.max_keys = max_keys
        self.balance_threshold = balance_threshold
        self._keys: list[OrderedDict[BlockKey, None]] = [OrderedDict() for _ in range(num_replicas)]
        self._turn = itertools.count()

    def pick(self, keys: list[BlockKey], loads: list[int | None]) -> int:
        """The replica for a prompt with these leading block keys; `loads[i]` is replica i's unfinished
        requests, None for a replica that is down.

        Raises:
            RuntimeError: every replica is down.
        """
        live = [i for i, load in enumerate(loads) if load is not None]
        if not live:
            raise RuntimeError("no engine replica is alive")
        if self.policy == "round_robin":
            return live[next(self._turn) % len(live)]
        least = min(loads[i] for i in live)
        if self.policy == "prefix" and keys:
            matches = {i: self.match_length(i, keys) for i in live}
            best = max(matches.values())
            if best > 0:
                candidates = [i for i in live if matches[i] == best]
                chosen = min(candidates, key=lambda i: loads[i])
                if loads[chosen] - least < self.balance_threshold:
                    return chosen
        # the least loaded; ties rotate so an idle cluster spreads its first requests
        idle = [i for i in live if loads[i] == least]
        return idle[next(self._turn) % len(idle)]

    def match_length(self, replica: int, keys: list[BlockKey]) -> int:
        """How many leading blocks of `keys` the replica was sent before (and may still cache)."""
        known = self._keys[replica]
        for n, key in enumerate(keys):
            if key not in known:
                return n
        return len(keys)

    def record(self, replica: int, keys: list[BlockKey]) -> None:
        """The replica now computes (and caches) these blocks."""
        known = self._keys[replica]
        for key in keys:
            known[key] = None
            known.move_to_end(key)
        while len(known) > self.max_keys:
            known.popitem(last=False)

    def forget(self, replica: int) -> None:
        """The replica restarted with an empty cache."""
        self._keys[replica].clear()

"""How many drafts each request verifies in a step: those that raise the batch's expected tokens per second,
while no request that cannot gain from them is slowed by more than a set share.

A step's verification rows cost what decode rows cost. Where a step is bound by reading the weights (one
sequence, or a few on a CPU whose matmuls stay memory-bound) extra rows are nearly free; where it is
compute-bound (a batch past the matmuls' knee) every row adds to the time of every request in the step,
including those whose drafts are rarely accepted or that have none. Following SmartSpec (Liu et al.,
"Optimizing Speculative Decoding for Serving Large Language Models Using Goodput", 2024), the plan weighs
each draft's chance of being accepted against the step time it adds, both measured as the engine runs.
"""

from __future__ import annotations

import bisect

import numpy as np


class AcceptanceEstimate:
    """A request's chance that a draft token is accepted given that the ones before it were.

    A verification round accepts drafts until its first rejection, so each round adds its accepted tokens
    as successes and one failure when it rejected one: successes / (successes + failures) estimates that
    chance (drafts modelled as independent trials). Older rounds count `DECAY` times less each, and one
    success and one failure stand in for the rounds not seen yet.
    """

    DECAY = 0.9

    def __init__(self) -> None:
        self.accepted = 1.0
        self.rejected = 1.0

    def record(self, num_drafted: int, num_accepted: int) -> None:
        self.accepted = self.accepted * self.DECAY + num_accepted
        self.rejected = self.rejected * self.DECAY + (1.0 if num_accepted < num_drafted else 0.0)

    @property
    def rate(self) -> float:
        return self.accepted / (self.accepted + self.rejected)


class StepCosts:
    """Measured seconds of decode-only steps by their number of rows (tokens).

    Each row count keeps an exponential average of its steps from its second step on (the first builds the
    native decode loop for that count: 15-30% slower on the bundled model), a step more than twice the
    average counting as twice it, so one stall does not keep a count from being tried again. A count not
    measured is estimated from the nearest counts measured: on the line between them; below the smallest,
    in proportion to the rows (as if compute-bound: pessimistic, so a plan that has only seen steps with
    drafts first tries fewer); above the largest, at the largest's time (optimistic, so a larger step is
    tried and then known).
    """

    SMOOTHING = 0.2  # weight of a new step in its row count's average

    def __init__(self) -> None:
        self._rows: list[int] = []  # sorted row counts measured
        self._seconds: dict[int, float] = {}
        self._first_seen: set[int] = set()  # counts whose first (warm-up) step was dropped

    def observe(self, num_rows: int, seconds: float) -> None:
        if num_rows < 1 or seconds <= 0.0:
            return
        old = self._seconds.get(num_rows)
        if old is not None:
            self._seconds[num_rows] = old + self.SMOOTHING * (min(seconds, 2.0 * old) - old)
        elif num_rows in self._first_seen:
            self._first_seen.discard(num_rows)
            bisect.insort(self._rows, num_rows)
            self._seconds[num_rows] = seconds
        else:
            self._first_seen.add(num_rows)

    def estimate(self, num_rows: int) -> float | None:
        """Seconds of a decode step of `num_rows` rows; None before any step was measured."""
        return self.estimates(num_rows, num_rows)[0] if self._rows else None

    def estimates(self, first: int, last: int) -> list[float]:
        """`estimate` of every row count from `first` to `last` (one pass: a plan reads thousands)."""
        rows = np.arange(first, last + 1, dtype=np.float64)
        known = np.array(self._rows, dtype=np.float64)
        seconds = np.interp(rows, known, np.array([self._seconds[r] for r in self._rows]))  # flat past either end
        below = rows < known[0]
        seconds[below] = self._seconds[self._rows[0]] * rows[below] / known[0]
        return seconds.tolist()


# A request whose drafts are accepted with a lower chance gains less than one token a round however many it
# drafts (a + a^2 + ... = a / (1 - a) < 1), so it is not expected to gain from a step made longer for drafts.
LOW_ACCEPTANCE = 0.5


def plan_drafts(num_decoding: int, rates: list[float], max_drafts: list[int], costs: StepCosts,
                max_request_slowdown: float, protected: list[bool], num_protected_idle: int) -> list[int]:
    """Drafts for each candidate request in a step of `num_decoding` decoding requests (the candidates among
    them; the others verify nothing).

    A request with acceptance chance a verifying k drafts emits E = 1 + a + ... + a^k tokens in
    expectation. Among the ways to hand out drafts (the most likely first: a request's j-th draft is
    accepted with chance a^j), the plan takes the one with the most expected tokens per second of the step,
    sum(E) / T(rows), the step without drafts included, such that every protected request (one that cannot
    or is not expected to gain) still emits at least (1 - max_request_slowdown) of its tokens per second in
    a step without drafts: E_i / T(rows) >= (1 - max_request_slowdown) / T(num_decoding).

    Args:
        rates: each candidate's acceptance chance (`AcceptanceEstimate.rate`).
        max_drafts: the most drafts each candidate may verify (> 0).
        protected: which candidates are protected.
        num_protected_idle: protected decoding requests that are not candidates (E = 1).
    Returns:
        drafts per candidate (0 to its maximum); the maximums while no decode step has been measured.
    """
    total = sum(max_drafts)
    plain = costs.estimate(num_decoding)
    if plain is None or total == 0:
        return list(max_drafts)
    by_gain = sorted(((rate ** j, i) for i, (rate, k) in enumerate(zip(rates, max_drafts)) for j in range(1, k + 1)),
                     key=lambda inc: -inc[0])
    # The most likely drafts first; and, since a protected candidate's own drafts loosen the bound it
    # sets, also its drafts first and then the others'. The better plan of the two orders wins.
    orders = [by_gain]
    if any(protected):
        orders.append([inc for inc in by_gain if protected[inc[1]]] + [inc for inc in by_gain if not protected[inc[1]]])
    best_goodput, best_plan = num_decoding / plain, [0] * len(rates)
    step_seconds = costs.estimates(num_decoding, num_decoding + total)  # [drafts]: T(num_decoding + drafts)
    for increments in orders:
        goodput, length = _best_prefix(num_decoding, increments, step_seconds, plain / (1.0 - max_request_slowdown),
                                       protected, num_protected_idle)
        if goodput > best_goodput:
            best_goodput, best_plan = goodput, [0] * len(rates)
            for _, i in increments[:length]:
                best_plan[i] += 1
    return best_plan


def _best_prefix(num_decoding: int, increments: list[tuple[float, int]], step_seconds: list[float],
                 allowed: float, protected: list[bool], num_protected_idle: int) -> tuple[float, int]:
    """(expected tokens per second, length) of the best prefix of `increments` whose step takes at most
    `allowed` times the least expected tokens of a protected request."""
    expected = [1.0] * len(protected)
    guarded = [i for i, p in enumerate(protected) if p]
    least = 1.0 if num_protected_idle or guarded else float("inf")
    tokens = float(num_decoding)
    best_goodput, best_len = 0.0, 0
    for length, (gain, i) in enumerate(increments, start=1):
        expected[i] += gain
        tokens += gain
        if protected[i] and not num_protected_idle:
            least = min(expected[g] for g in guarded)
        seconds = step_seconds[length]
        if seconds <= allowed * least and tokens / seconds > best_goodput:
            best_goodput, best_len = tokens / seconds, length
    return best_goodput, best_len

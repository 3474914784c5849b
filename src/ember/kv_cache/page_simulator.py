"""Page-size simulator: sampled sequence lengths drive the real `BlockAllocator`, and each page size
gets its internal fragmentation, peak blocks and allocator speed (no torch, no model)."""

from __future__ import annotations

import heapq
import math
import time
from array import array
from dataclasses import dataclass, field

import numpy as np

from ember.kv_cache.block_allocator import BlockAllocator

GROWTH_MODES = ("once", "token")
_LENGTH_KINDS = ("normal", "lognormal", "uniform")
_ALLOCATE = -1  # op-log entry for an allocate call; a free is logged as its block id


@dataclass(frozen=True)
class LengthSpec:
    """A distribution of sequence lengths in tokens: `normal:MEAN:STD`, `lognormal:MU:SIGMA` (of
    the log) or `uniform:LO:HI` (integers, inclusive). Draws are rounded to the nearest integer,
    then clipped to `[1, max_len]`: the mass below 1 becomes length 1, the mass above `max_len`
    becomes `max_len`."""

    kind: str
    a: float
    b: float

    @classmethod
    def parse(cls, text: str) -> "LengthSpec":
        """Raises ValueError for an unknown kind, a wrong arity or out-of-range parameters."""
        kind, *params = text.split(":")
        if kind not in _LENGTH_KINDS or len(params) != 2:
            raise ValueError(f"lengths must be one of {', '.join(k + ':A:B' for k in _LENGTH_KINDS)}, "
                             f"got {text!r}")
        try:
            a, b = float(params[0]), float(params[1])
        except ValueError:
            raise ValueError(f"lengths {text!r}: parameters must be numbers") from None
        if kind == "uniform" and not (a.is_integer() and b.is_integer() and a <= b):
            raise ValueError(f"lengths {text!r}: uniform needs integers LO <= HI")
        if kind != "uniform" and not b > 0:
            raise ValueError(f"lengths {text!r}: the spread must be positive")
        return cls(kind, a, b)

    def sample(self, rng: np.random.Generator, num: int, max_len: int) -> np.ndarray:
        """`num` lengths, int64 in `[1, max_len]`."""
        if self.kind == "uniform":
            draws = rng.integers(int(self.a), int(self.b) + 1, num)
        elif self.kind == "normal":
            draws = np.rint(rng.normal(self.a, self.b, num))
        else:
            draws = np.rint(rng.lognormal(self.a, self.b, num))
        return np.clip(draws, 1, max_len).astype(np.int64)

    def pmf(self, max_len: int) -> np.ndarray:
        """`P(L = k)` at index `k - 1` for `k` in `1..max_len`, exactly as `sample` draws L."""
        if self.kind == "uniform":
            values = np.clip(np.arange(int(self.a), int(self.b) + 1), 1, max_len)
            return np.bincount(values, minlength=max_len + 1)[1:] / len(values)
        edges = np.arange(1, max_len) + 0.5  # L = k  <=>  k - 0.5 <= X < k + 0.5, inside the clip
        if self.kind == "lognormal":
            edges = np.log(edges)
        z = (edges - self.a) / (self.b * math.sqrt(2.0))
        cdf = 0.5 * (1.0 + np.vectorize(math.erf)(z))
        return np.diff(np.concatenate(([0.0], cdf, [1.0])))


@dataclass(frozen=True)
class PageSimConfig:
    """One simulator run; each field is a flag of `ember sim pages`."""

    lengths: str = field(default="normal:200:120", metadata={
        "help": "length distribution: normal:MEAN:STD, lognormal:MU:SIGMA or uniform:LO:HI"})
    trace: str | None = field(default=None, metadata={
        "help": "file with one sequence length per line, used in order instead of --lengths "
                "(--num-seqs is then ignored)"})
    max_len: int = field(default=4096, metadata={"help": "lengths are clipped to [1, max-len]"})
    num_seqs: int = field(default=10000, metadata={"help": "sequences sampled from --lengths"})
    page_sizes: str = field(default="8,16,32,64", metadata={"help": "comma-separated tokens per block"})
    concurrency: int = field(default=256, metadata={"help": "sequences alive at once"})
    growth: str = field(default="once", metadata={
        "help": "once: a sequence takes all its blocks on arrival and ends at a random step; "
                "token: it grows one token a step, a block at each page boundary, and ends at its length"})
    seed: int = field(default=0, metadata={"help": "seed of the lengths and the completion order"})

    def __post_init__(self) -> None:
        if self.trace is None:
            LengthSpec.parse(self.lengths)
        for name in ("max_len", "num_seqs", "concurrency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.growth not in GROWTH_MODES:
            raise ValueError(f"growth must be one of {GROWTH_MODES}, got {self.growth!r}")
        try:
            sizes = self.page_size_list
        except ValueError:
            raise ValueError(f"page_sizes must be comma-separated integers, got {self.page_sizes!r}") from None
        if not sizes or min(sizes) <= 0:
            raise ValueError(f"page_sizes must be positive, got {self.page_sizes!r}")

    @property
    def page_size_list(self) -> list[int]:
        """`page_sizes` parsed; raises ValueError on a non-integer entry."""
        return [int(s) for s in self.page_sizes.split(",") if s.strip()]


@dataclass(frozen=True)
class PageSimResult:
    """What one page size did over a run.

    `fragmentation` is time-averaged: allocated-but-empty slot-steps over allocated slot-steps,
    summed over every step of the run (each sequence's whole life is inside the run).
    `expected_fragmentation` is the same quantity from the length distribution, as a check.
    """

    page_size: int
    growth: str
    num_seqs: int
    concurrency: int
    fragmentation: float
    expected_fragmentation: float
    peak_blocks: int
    peak_slots: int  # peak_blocks * page_size: the peak KV memory, in tokens
    num_allocator_ops: int  # allocate + free calls
    allocator_ops_per_s: float  # those calls replayed on a fresh allocator, per second


@dataclass
class _Tally:
    """Running sums of one simulation: slot-steps, token-steps, the peak, the op log."""

    page_size: int
    slot_steps: int = 0
    token_steps: int = 0
    peak_blocks: int = 0
    log: array = field(default_factory=lambda: array("q"))

    def observe(self, num_blocks: int, num_tokens: int, num_steps: int = 1) -> None:
        """`num_steps` steps with the pool at `num_blocks` (the tokens given summed over them)."""
        self.slot_steps += num_blocks * self.page_size * num_steps
        self.token_steps += num_tokens
        self.peak_blocks = max(self.peak_blocks, num_blocks)


def sample_lengths(config: PageSimConfig) -> np.ndarray:
    """The run's lengths: the trace's lines (clipped) or `num_seqs` draws of `config.lengths`."""
    if config.trace is not None:
        with open(config.trace) as f:
            lengths = [int(line) for line in f if line.strip() and not line.lstrip().startswith("#")]
        if not lengths:
            raise ValueError(f"trace {config.trace} holds no lengths")
        return np.clip(np.array(lengths, dtype=np.int64), 1, config.max_len)
    rng = np.random.default_rng(config.seed)
    return LengthSpec.parse(config.lengths).sample(rng, config.num_seqs, config.max_len)


def length_pmf(config: PageSimConfig, lengths: np.ndarray) -> np.ndarray:
    """The distribution the expectation is taken over: the spec's, or the trace's own counts."""
    if config.trace is not None:
        return np.bincount(lengths, minlength=config.max_len + 1)[1:] / len(lengths)
    return LengthSpec.parse(config.lengths).pmf(config.max_len)


def expected_fragmentation(pmf: np.ndarray, page_size: int, growth: str) -> float:
    """E[empty slots] / E[allocated slots] of one sequence, over its life, for lengths ~ `pmf`.

    once: a sequence of length L holds ceil(L/page)*page slots for a lifetime independent of L.
    token: it spends one step at each length 1..L, so both sums run over those steps; short
    lengths weigh more there, which makes this larger than `once` at the same page size.
    """
    k = np.arange(1, len(pmf) + 1)
    slots = -(-k // page_size) * page_size
    empty = slots - k
    if growth == "token":
        slots, empty = np.cumsum(slots), np.cumsum(empty)
    return float(pmf @ empty / (pmf @ slots))


def _run_once(lengths: list[int], tally: _Tally, allocator: BlockAllocator, concurrency: int,
              picks: np.ndarray) -> None:
    """Each step: arrivals fill the pool to `concurrency`, the state is observed, then one live
    sequence picked uniformly (`picks[step]` in [0, 1)) frees all its blocks."""
    page, log = tally.page_size, tally.log
    live: list[tuple[list[int], int]] = []
    num_tokens = next_seq = 0
    for step in range(len(lengths)):
        while len(live) < concurrency and next_seq < len(lengths):
            length = lengths[next_seq]
            next_seq += 1
            blocks = [allocator.allocate() for _ in range(-(-length // page))]
            log.extend([_ALLOCATE] * len(blocks))
            live.append((blocks, length))
            num_tokens += length
        tally.observe(allocator.num_allocated, num_tokens)
        index = int(picks[step] * len(live))
        live[index], live[-1] = live[-1], live[index]
        blocks, length = live.pop()
        for block_id in blocks:
            allocator.free(block_id)
        log.extend(blocks)
        num_tokens -= length


def _run_token(lengths: list[int], tally: _Tally, allocator: BlockAllocator, concurrency: int) -> None:
    """Every live sequence gains one token a step (one at its arrival step); it takes a block when
    its length crosses a page boundary and frees them all at the step after its last token, when
    the next sequence arrives. Event-driven: the state only changes at those steps."""
    page, log = tally.page_size, tally.log
    starts = [0] * len(lengths)
    tables: list[list[int]] = [[] for _ in lengths]
    heap: list[tuple[int, int]] = []  # (step of the next event, sequence)
    num_live = sum_starts = next_seq = step = 0
    while True:
        finished, growing = [], []
        while heap and heap[0][0] == step:
            seq = heapq.heappop(heap)[1]
            (growing if len(tables[seq]) * page < lengths[seq] else finished).append(seq)
        for seq in finished:  # free before allocating: at this step the sequence holds nothing
            log.extend(tables[seq])
            for block_id in tables[seq]:
                allocator.free(block_id)
            num_live -= 1
            sum_starts -= starts[seq]
        while num_live < concurrency and next_seq < len(lengths):
            starts[next_seq], num_live, sum_starts = step, num_live + 1, sum_starts + step
            growing.append(next_seq)
            next_seq += 1
        for seq in growing:
            tables[seq].append(allocator.allocate())
            log.append(_ALLOCATE)
            filled = len(tables[seq]) * page
            heapq.heappush(heap, (starts[seq] + min(filled, lengths[seq]), seq))
        if not heap:
            return
        last_step, step = step, heap[0][0]
        # Steps last_step..step-1 are alike; a sequence started at s holds t - s + 1 tokens at step t.
        num_tokens = num_live * (step * (step + 1) - last_step * (last_step + 1)) // 2 \
            - sum_starts * (step - last_step)
        tally.observe(allocator.num_allocated, num_tokens, step - last_step)


def _replay_ops_per_s(log: array, num_blocks: int) -> float:
    """Allocator calls per second: the run's exact call sequence on a fresh allocator, which hands
    out the same ids because it always takes the lowest free one. The loop's own cost is included."""
    allocator = BlockAllocator(num_blocks)
    allocate, free = allocator.allocate, allocator.free
    start = time.perf_counter()
    for op in log:
        if op < 0:
            allocate()
        else:
            free(op)
    elapsed = time.perf_counter() - start
    return len(log) / elapsed if elapsed > 0 else float("inf")


def simulate_page_size(lengths: np.ndarray, page_size: int, concurrency: int, growth: str = "once",
                       seed: int = 0, pmf: np.ndarray | None = None) -> PageSimResult:
    """Run every sequence of `lengths` through a `BlockAllocator` sized so that none waits.

    Args:
        lengths: sequence lengths in tokens (>= 1), in arrival order.
        page_size: tokens per block.
        concurrency: sequences alive at once.
        growth: "once" or "token" (see `PageSimConfig.growth`).
        seed: seeds the completion order of "once".
        pmf: the length distribution for `expected_fragmentation`; default: the lengths' own.

    Raises:
        ValueError: for an unknown growth mode or a length below 1.
    """
    if growth not in GROWTH_MODES:
        raise ValueError(f"growth must be one of {GROWTH_MODES}, got {growth!r}")
    seq_lengths = [int(n) for n in lengths]
    if min(seq_lengths) < 1:
        raise ValueError("every length must be at least 1")
    num_blocks = min(concurrency, len(seq_lengths)) * -(-max(seq_lengths) // page_size)
    allocator, tally = BlockAllocator(num_blocks), _Tally(page_size)
    if growth == "once":
        picks = np.random.default_rng(seed).random(len(seq_lengths))
        _run_once(seq_lengths, tally, allocator, concurrency, picks)
    else:
        _run_token(seq_lengths, tally, allocator, concurrency)
    assert allocator.num_allocated == 0, "the run ended with blocks still allocated"
    if pmf is None:
        pmf = np.bincount(seq_lengths)[1:] / len(seq_lengths)
    return PageSimResult(
        page_size, growth, len(seq_lengths), concurrency,
        fragmentation=1.0 - tally.token_steps / tally.slot_steps,
        expected_fragmentation=expected_fragmentation(pmf, page_size, growth),
        peak_blocks=tally.peak_blocks, peak_slots=tally.peak_blocks * page_size,
        num_allocator_ops=len(tally.log), allocator_ops_per_s=_replay_ops_per_s(tally.log, num_blocks))


def run_page_sim(config: PageSimConfig) -> list[PageSimResult]:
    """One result per page size, all on the same sampled lengths and completion order."""
    lengths = sample_lengths(config)
    pmf = length_pmf(config, lengths)
    return [simulate_page_size(lengths, page_size, config.concurrency, config.growth, config.seed, pmf)
            for page_size in config.page_size_list]

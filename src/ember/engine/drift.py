"""Activation drift of each request at a monitored layer against a calibrated reference: the signal of
per-request precision fallback.

The reference is a 512-bin histogram of the monitored activations over calibration text, with its
skewness. Each request accumulates the same histogram over a sliding window of its own tokens (the last
``interval`` tokens) and its moments; every ``interval`` generated tokens the monitor scores the window:
KL(window || reference) and the window's skewness. Over either threshold: the request drifted.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import torch

NUM_BINS = 512
CHECK_INTERVAL = 64
_EPS = 1e-6  # added to every bin before normalizing, so an empty reference bin keeps KL finite


@dataclasses.dataclass(frozen=True)
class DriftReference:
    """Calibrated histogram of the monitored activations: ``num_bins`` equal bins over [low, high]
    (values outside fall in the end bins), as probabilities, and the calibration skewness."""

    module: str
    low: float
    high: float
    probs: tuple[float, ...]
    skew: float

    @classmethod
    def calibrate(cls, module: str, activations: torch.Tensor, num_bins: int = NUM_BINS) -> "DriftReference":
        """Reference from calibration activations [tokens, hidden]: the range is their 0.1-99.9 percentile."""
        values = activations.reshape(-1).float()
        sample = values[torch.randperm(values.numel(), generator=torch.Generator().manual_seed(0))[:1 << 22]]
        low, high = (float(q) for q in torch.quantile(sample, torch.tensor([0.001, 0.999])))
        counts = histogram(values, low, high, num_bins)
        probs = (counts + _EPS) / (counts + _EPS).sum()
        return cls(module, low, high, tuple(probs.tolist()), moments_skew(moments(values)))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"probs": list(self.probs)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DriftReference":
        return cls(data["module"], data["low"], data["high"], tuple(data["probs"]), data["skew"])


def histogram(values: torch.Tensor, low: float, high: float, num_bins: int) -> torch.Tensor:
    """Counts of ``values`` in ``num_bins`` equal bins over [low, high], clamping outliers to the end bins."""
    return torch.bincount(bin_index(values, low, high, num_bins).reshape(-1), minlength=num_bins).double()


def bin_index(values: torch.Tensor, low: float, high: float, num_bins: int) -> torch.Tensor:
    """The bin of each value (same shape, int64): equal bins over [low, high], outliers in the end bins."""
    return ((values.float() - low) * (num_bins / (high - low))).floor().clamp_(0, num_bins - 1).long()


def moments(values: torch.Tensor) -> torch.Tensor:
    """[count, sum x, sum x^2, sum x^3] in float64, additive over windows."""
    x = values.reshape(-1).double()
    return torch.stack([torch.tensor(float(x.numel()), dtype=torch.float64), x.sum(), x.pow(2).sum(), x.pow(3).sum()])


def moments_skew(m: torch.Tensor) -> float:
    """Pearson's skewness from [n, sum x, sum x^2, sum x^3]."""
    n, s1, s2, s3 = (float(v) for v in m)
    mean = s1 / n
    var = max(s2 / n - mean * mean, 1e-30)
    third = s3 / n - 3 * mean * s2 / n + 2 * mean ** 3
    return third / var ** 1.5


@dataclasses.dataclass(frozen=True)
class DriftCheck:
    """One window's verdict for one request."""

    kl: float
    skew: float
    drifted: bool


class DriftMonitor:
    """Per-request sliding-window histograms and moments of the monitored rows, checked every ``interval``.

    A request's window is one row of a table ([slots, num_bins + 4]: its bin counts, then its moments),
    so a step adds every request's rows with one ``index_add_``; rows are reused after `release`.

    Args:
        reference: the calibrated histogram.
        kl_threshold: drift when KL(window || reference) exceeds it.
        skew_threshold: drift when |skew(window) - skew(reference)| exceeds it.
        interval: tokens per window (and between checks).
    """

    def __init__(self, reference: DriftReference, kl_threshold: float = 0.02, skew_threshold: float = 3.0,
                 interval: int = CHECK_INTERVAL) -> None:
        self.reference = reference
        self.log_ref = torch.tensor(reference.probs, dtype=torch.float64).log()
        self.kl_threshold, self.skew_threshold, self.interval = kl_threshold, skew_threshold, interval
        self._num_bins = len(reference.probs)
        self._table = torch.zeros(0, self._num_bins + 4, dtype=torch.float64)
        self._slots: dict[str, int] = {}  # request id -> its row of the table
        self._free: list[int] = []
        self._tokens: dict[str, int] = {}

    def observe(self, request_ids: list[str], rows: torch.Tensor, num_rows: list[int] | None = None) -> None:
        """Add the activations [rows, hidden] of the requests' newest tokens: request i owns the next
        ``num_rows[i]`` rows (default one each)."""
        if not request_ids:
            return
        num_bins, ref, n = self._num_bins, self.reference, len(request_ids)
        if num_rows is None or all(count == 1 for count in num_rows):
            num_rows, owner = [1] * n, torch.arange(n)
        else:
            owner = torch.repeat_interleave(torch.arange(n), torch.tensor(num_rows))  # [rows]
        index = bin_index(rows, ref.low, ref.high, num_bins)  # [rows, hidden]
        # one bincount for the whole batch: request i's bins are [i * num_bins, (i + 1) * num_bins)
        counts = torch.bincount((index + owner.unsqueeze(1) * num_bins).reshape(-1),
                                minlength=n * num_bins).view(n, num_bins).double()
        x = rows.double()
        per_row = torch.stack([torch.full((x.shape[0],), float(x.shape[1]), dtype=torch.float64),
                               x.sum(1), x.pow(2).sum(1), x.pow(3).sum(1)], dim=1)  # [rows, 4]
        stats = torch.zeros(n, 4, dtype=torch.float64).index_add_(0, owner, per_row)
        slots = torch.tensor([self._slot(request_id) for request_id in request_ids])
        self._table.index_add_(0, slots, torch.cat([counts, stats], dim=1))
        for request_id, count in zip(request_ids, num_rows):
            self._tokens[request_id] = self._tokens.get(request_id, 0) + count

    def check(self, request_id: str) -> DriftCheck | None:
        """The verdict once the request's window is full (then the window restarts), else None."""
        if self._tokens.get(request_id, 0) < self.interval:
            return None
        window = self._table[self._slots[request_id]]
        counts = window[:self._num_bins] + _EPS
        probs = counts / counts.sum()
        kl = float((probs * (probs.log() - self.log_ref)).sum())
        skew = moments_skew(window[self._num_bins:])
        self.release(request_id)
        drifted = kl > self.kl_threshold or abs(skew - self.reference.skew) > self.skew_threshold
        return DriftCheck(kl, skew, drifted)

    def release(self, request_id: str) -> None:
        """Forget a request's window (finished, aborted or already fallen back)."""
        slot = self._slots.pop(request_id, None)
        if slot is not None:
            self._table[slot].zero_()
            self._free.append(slot)
        self._tokens.pop(request_id, None)

    def _slot(self, request_id: str) -> int:
        """The request's row of the table, a free (zeroed) one for a new window; the table doubles when full."""
        slot = self._slots.get(request_id)
        if slot is None:
            if not self._free:
                grown = max(16, 2 * len(self._table))
                self._free = list(range(grown - 1, len(self._table) - 1, -1))
                more = self._table.new_zeros(grown - len(self._table), self._num_bins + 4)
                self._table = torch.cat([self._table, more])
            slot = self._slots[request_id] = self._free.pop()
        return slot

"""Drift monitor: histograms against numpy, skewness against a closed form, verdicts on in- and
out-of-distribution windows, batched observation equal to one request at a time."""
import numpy as np
import pytest
import torch

from ember.engine.drift import DriftMonitor, DriftReference, histogram, moments, moments_skew


def test_histogram_matches_numpy_inside_the_range():
    values = torch.rand(10_000, generator=torch.Generator().manual_seed(0)) * 4 - 2
    expected, _ = np.histogram(values.numpy(), bins=64, range=(-2.0, 2.0))
    assert histogram(values, -2.0, 2.0, 64).tolist() == expected.tolist()
    assert histogram(torch.tensor([-50.0, 50.0]), -2.0, 2.0, 64)[[0, -1]].tolist() == [1.0, 1.0]  # end bins


def test_skewness_from_moments():
    gen = torch.Generator().manual_seed(0)
    exponential = -torch.log(torch.rand(400_000, generator=gen, dtype=torch.float64))
    assert moments_skew(moments(exponential)) == pytest.approx(2.0, abs=0.05)  # Exp(1)
    halves = moments(exponential[:1000]) + moments(exponential[1000:])
    assert moments_skew(halves) == pytest.approx(moments_skew(moments(exponential)))  # additive


@pytest.fixture
def reference():
    calib = torch.randn(4096, 576, generator=torch.Generator().manual_seed(1))
    return DriftReference.calibrate("model.norm", calib)


def test_in_distribution_window_passes_and_shifted_one_drifts(reference):
    """The defaults on SmolLM2's width: a 64-token window holds 36,864 values, enough that the KL of a
    window drawn from the reference itself stays well under 0.02 (its bias is ~bins / 2n = 0.007)."""
    monitor = DriftMonitor(reference)
    gen = torch.Generator().manual_seed(2)
    for step in range(64):
        assert monitor.check("a") is None  # the window is not full yet
        normal = torch.randn(1, 576, generator=gen)
        shifted = torch.randn(1, 576, generator=gen) * 3 + 2
        monitor.observe(["a", "b"], torch.cat([normal, shifted]))
    calm, drift = monitor.check("a"), monitor.check("b")
    assert not calm.drifted and calm.kl < 0.02 and abs(calm.skew) < 0.1
    assert drift.drifted and drift.kl > 1.0
    assert monitor.check("a") is None  # the window restarted


def test_skew_alone_triggers(reference):
    monitor = DriftMonitor(reference, kl_threshold=1e9, skew_threshold=1.0, interval=4)
    gen = torch.Generator().manual_seed(3)
    rows = torch.randn(4, 576, generator=gen)
    rows[:, 0] = 40.0  # one huge positive channel in every token: a long right tail
    for row in rows:
        monitor.observe(["r"], row.unsqueeze(0))
    check = monitor.check("r")
    assert check.drifted and check.skew > 3.0


def test_batched_observation_equals_single(reference):
    rows = torch.randn(3, 576, generator=torch.Generator().manual_seed(4))
    batched, single = DriftMonitor(reference, interval=1), DriftMonitor(reference, interval=1)
    batched.observe(["x", "y", "z"], rows)
    for request_id, row in zip("xyz", rows):
        single.observe([request_id], row.unsqueeze(0))
    for request_id in "xyz":
        assert batched.check(request_id) == single.check(request_id)
    assert DriftReference.from_dict(reference.to_dict()) == reference


def test_several_rows_per_request_equal_one_at_a_time(reference):
    rows = torch.randn(5, 576, generator=torch.Generator().manual_seed(5))
    grouped, single = DriftMonitor(reference, interval=3), DriftMonitor(reference, interval=3)
    grouped.observe(["p", "q"], rows, [3, 2])
    for index, owner in enumerate("pppqq"):
        single.observe([owner], rows[index:index + 1])
    assert grouped.check("p") == single.check("p") and grouped.check("q") is single.check("q") is None


def test_windows_of_released_requests_leave_nothing_behind(reference):
    """Requests come and go in one monitor (more of them than its first table holds, rows reused after a
    check or a release): each verdict equals that of a fresh monitor fed only that request's rows."""
    gen = torch.Generator().manual_seed(6)
    monitor = DriftMonitor(reference, interval=2)
    for wave in range(3):
        ids = [f"{wave}-{i}" for i in range(20)]
        rows = [torch.randn(2, 576, generator=gen) * (1 + i % 3) for i in range(20)]
        for step in range(2):
            monitor.observe(ids, torch.cat([r[step:step + 1] for r in rows]))
        for i, request_id in enumerate(ids):
            if i % 4 == 3:
                monitor.release(request_id)  # aborted before its check
                continue
            fresh = DriftMonitor(reference, interval=2)
            fresh.observe([request_id], rows[i], [2])
            assert monitor.check(request_id) == fresh.check(request_id)

"""The sensitivity statistics against independent computations (numpy, closed forms, torch's KL)."""
import numpy as np
import pytest
import torch

from ember.analysis.statistics import dispersion, kl_divergence, skewness, spearman, spectral_energy


def test_dispersion_matches_numpy_percentiles():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(500, 6, generator=gen)
    x[7, 3] = 40.0  # one outlier token in channel 3
    arr = x.numpy().astype(np.float64)
    q1, q3 = np.percentile(arr, 25, axis=0), np.percentile(arr, 75, axis=0)
    expected = ((arr.max(0) - arr.min(0)) / (q3 - q1)).max()
    assert dispersion(x) == pytest.approx(expected, rel=1e-5)
    assert dispersion(x) > 15 > dispersion(torch.randn(500, 6, generator=gen))


def test_spectral_energy_closed_forms():
    u, v = torch.randn(8, 1), torch.randn(1, 5)
    assert spectral_energy(u @ v) == pytest.approx(1.0, abs=1e-6)  # rank one: all energy in sigma_1
    assert spectral_energy(torch.eye(4) * 3) == pytest.approx(0.25)  # equal singular values


def test_skewness_of_known_distributions():
    gen = torch.Generator().manual_seed(0)
    exponential = -torch.log(torch.rand(400_000, generator=gen, dtype=torch.float64))
    assert skewness(exponential) == pytest.approx(2.0, abs=0.05)  # Exp(1): skewness 2
    assert abs(skewness(torch.randn(400_000, generator=gen))) < 0.02
    assert skewness(-exponential) == pytest.approx(-skewness(exponential))


def test_kl_matches_torch():
    gen = torch.Generator().manual_seed(0)
    p = torch.log_softmax(torch.randn(5, 11, generator=gen), -1)
    q = torch.log_softmax(torch.randn(5, 11, generator=gen), -1)
    expected = torch.nn.functional.kl_div(q, p, log_target=True, reduction="none").sum(-1)
    torch.testing.assert_close(kl_divergence(p, q).float(), expected, rtol=1e-5, atol=1e-7)
    assert torch.all(kl_divergence(p, p).abs() < 1e-7)


def test_spearman_against_the_difference_formula():
    a = [3.0, 1.0, 4.0, 1.5, 5.0, 9.0, 2.0]
    b = [2.0, 7.0, 1.0, 8.0, 2.5, 8.5, 0.5]
    ra, rb = np.argsort(np.argsort(a)), np.argsort(np.argsort(b))  # no ties: plain ranks
    n = len(a)
    expected = 1 - 6 * ((ra - rb) ** 2).sum() / (n * (n * n - 1))
    assert spearman(a, b) == pytest.approx(expected)
    assert spearman(a, a) == pytest.approx(1.0) and spearman(a, [-v for v in a]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 2, 3]) == pytest.approx(1.0)  # ties share their mean rank

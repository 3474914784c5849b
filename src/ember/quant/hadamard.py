"""Hadamard matrices of many orders (Sylvester x Paley Kronecker products) and random orthogonal ones."""
from __future__ import annotations

import functools

import torch


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


@functools.lru_cache(maxsize=None)
def _paley(order: int) -> torch.Tensor:
    """Paley construction I: order q + 1 for a prime q = 3 (mod 4), entries +-1."""
    q = order - 1
    residues = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0] + [1 if i in residues else -1 for i in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    jacobsthal = chi[(idx.view(1, -1) - idx.view(-1, 1)) % q]  # Q[i, j] = chi(j - i), skew-symmetric
    skew = torch.zeros(order, order, dtype=torch.float64)
    skew[0, 1:] = 1
    skew[1:, 0] = -1
    skew[1:, 1:] = jacobsthal
    return skew + torch.eye(order, dtype=torch.float64)


def _factor(n: int) -> list[int] | None:
    """Write n = 2^k * prod(paley orders); returns the Paley factors, or None."""
    if n == 1:
        return []
    if n % 2 == 0:
        rest = _factor(n // 2)
        if rest is not None:
            return rest
    for order in range(4, n + 1, 4):
        if n % order == 0 and order % 4 == 0 and _is_prime(order - 1) and (order - 1) % 4 == 3:
            rest = _factor(n // order)
            if rest is not None:
                return [order] + rest
    return None


def has_hadamard(n: int) -> bool:
    """Whether ``hadamard_matrix(n)`` can build an order-n Hadamard matrix."""
    return _factor(n) is not None


def hadamard_matrix(n: int) -> torch.Tensor:
    """An n x n matrix with entries +-1 and H H^T = n I (float64).

    Built as Sylvester [[1, 1], [1, -1]]^(x k) Kronecker Paley factors, e.g.
    576 = Paley(72, q=71) x Sylvester 8; 1536 = Paley(12) x 2^7; 64 = Sylvester 2^6.
    Raises:
        ValueError: if n has no such factorisation.
    """
    factors = _factor(n)
    if factors is None:
        raise ValueError(f"no Sylvester/Paley Hadamard construction of order {n}")
    out = torch.ones(1, 1, dtype=torch.float64)
    for order in factors:
        out = torch.kron(out, _paley(order))
    sylvester = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    while out.shape[0] < n:
        out = torch.kron(out, sylvester)
    return out


def random_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """Orthogonal n x n matrix diag(random signs) H / sqrt(n) (QuaRot's randomized Hadamard), float64.

    Falls back to a random orthogonal matrix (QR of a Gaussian, sign-fixed) when no Hadamard of
    order n is constructible here; every entry then no longer has magnitude 1/sqrt(n).
    """
    gen = torch.Generator().manual_seed(seed)
    if has_hadamard(n):
        signs = torch.randint(0, 2, (n,), generator=gen).double() * 2 - 1
        return signs.view(-1, 1) * hadamard_matrix(n) / n ** 0.5
    q, r = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r)).view(1, -1)

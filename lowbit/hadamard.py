"""Hadamard matrices and fast Hadamard rotations: the math of QuaRot / QuIP# style incoherence processing.

A Hadamard matrix ``H`` of order ``n`` has entries +-1 and ``H @ H.T == n * I``, so ``H / sqrt(n)`` is an
orthogonal rotation that spreads every outlier evenly over all coordinates. QuaRot (Ashkboos et al. 2024,
section 3-4) multiplies the residual stream and weights by a randomized Hadamard ``H diag(s) / sqrt(n)`` and
applies online Hadamards to activations with the fast transform; QuIP# (Tseng et al. 2024, section 3) does the
same for incoherence. Orders that are not powers of two (576, 640, 1536, ...) are written ``n = 2^k * m``:

* ``2^k``: Sylvester (1867), ``H_2n = [[H_n, H_n], [H_n, -H_n]]``; applied by :func:`fwht` in O(n log n).
* ``m = q + 1``, ``q`` prime, ``q % 4 == 3``: Paley construction I (Paley 1933), ``H = I + S`` with
  ``S = [[0, 1^T], [-1, Q]]`` skew-symmetric (so ``H`` is **not** symmetric).
* ``m = 2 (q + 1)``, ``q`` prime, ``q % 4 == 1``: Paley construction II, ``C = [[0, 1^T], [1, Q]]`` symmetric,
  ``H = I (x) [[1, -1], [-1, -1]] + C (x) [[1, 1], [1, -1]]`` (symmetric).

``Q`` is the Jacobsthal matrix ``Q[i, j] = legendre(j - i, q)``. Where both Paley rules give ``m`` (12, 60,
84, ...) construction I is used. The full matrix is ``H_n = kron(H_m, H_{2^k})`` with the largest power of two
that leaves a base order ``m`` (:func:`hadamard_order_split`). Pure tensor functions; nothing walks modules.
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch

from lowbit.errors import InputError

_HALF = (torch.float16, torch.bfloat16)


def hadamard_order_split(n: int) -> tuple[int, int]:
    """``(2^k, m)`` with ``n == 2^k * m``, ``m`` a base order and ``2^k`` as large as possible.

    Raises InputError naming ``n``, the base orders up to 200 and the nearest supported widths when ``n`` is
    not a positive int or its odd part times every power of two up to ``n`` is no base order.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"Hadamard width {n!r} must be a positive int; "
                         f"{_supported_text(n if isinstance(n, int) and not isinstance(n, bool) else 0)}")
    split = _split(n)
    if split is not None:
        return split
    raise InputError(f"no Hadamard matrix of width {n}: widths must be 2^k * m with m a base order; "
                     f"{_supported_text(n)}")


def is_hadamard_width(n: int) -> bool:
    """True when :func:`hadamard_matrix` can build order ``n``."""
    return not isinstance(n, bool) and isinstance(n, int) and n >= 1 and _split(n) is not None


def hadamard_base_orders(limit: int = 200) -> list[int]:
    """The base orders ``m <= limit`` the constructions give (1, Paley I and II; powers of two included)."""
    return [m for m in range(1, limit + 1) if _is_base_order(m)]


def hadamard_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n) Hadamard matrix, entries +-1, ``H @ H.T == n * I``; ``kron(H_m, H_{2^k})`` (see module doc).

    Sylvester order in the ``2^k`` factor, so for a power of two ``x @ hadamard_matrix(n) == fwht(x)``.
    """
    p, m = hadamard_order_split(n)
    H_p = torch.ones(1, 1, dtype=torch.int64)
    H_2 = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)
    for _ in range(p.bit_length() - 1):
        H_p = torch.kron(H_2, H_p)  # (2h, 2h) = [[H, H], [H, -H]]
    return torch.kron(_base_matrix(m), H_p).to(dtype)  # (n, n), index i = i_m * p + i_p


def fwht(x: torch.Tensor) -> torch.Tensor:
    """Unnormalized fast Walsh-Hadamard transform along the last dim: ``x @ hadamard_matrix(n)``, n = 2^k.

    ``x``: (..., n) floating; returns the same shape and dtype. fp16/bf16 are computed in fp32 and cast back,
    fp32/fp64 in their own dtype. log2(n) butterfly stages on views of one working copy; no dense matmul.
    """
    n = _last_dim(x, "fwht")
    if n & (n - 1):
        raise InputError(f"fwht: the last dim {n} of shape {tuple(x.shape)} must be a power of two; "
                         f"use hadamard_transform for other widths")
    return _fwht_(_working_copy(x)).to(x.dtype)


def hadamard_transform(x: torch.Tensor, normalize: bool = True, transpose: bool = False) -> torch.Tensor:
    """``x @ H_n`` (``transpose``: ``x @ H_n.T``) along the last dim, divided by ``sqrt(n)`` when ``normalize``.

    ``x``: (..., n) floating, n any width :func:`hadamard_order_split` accepts; same shape and dtype back
    (half types computed in fp32). Normalized, ``x -> x @ H_n / sqrt(n)`` is orthogonal and its inverse is the
    ``transpose=True`` transform: ``hadamard_transform(hadamard_transform(x), transpose=True) == x``. (For
    Sylvester and Paley II orders ``H_n`` is symmetric and the two coincide; for Paley I they do not.)
    Cost O(n (log n + m)): the ``2^k`` factor by :func:`fwht`, the ``m`` factor by an (m, m) matmul.
    """
    n = _last_dim(x, "hadamard_transform")
    p, m = hadamard_order_split(n)
    X = _fwht_(_working_copy(x).view(*x.shape[:-1], m, p))  # (..., m, p) @ H_p; i = i_m * p + i_p
    if m > 1:
        H_m = _base_matrix(m).to(X.dtype).to(X.device)  # (m, m)
        # x @ kron(H_m, H_p) == H_m^T X H_p per row; the transpose uses H_m X H_p (H_p is symmetric)
        X = torch.matmul(H_m if transpose else H_m.T, X)
    if normalize:
        X = X.mul_(1.0 / math.sqrt(n))
    return X.reshape(x.shape).to(x.dtype)


def random_hadamard(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n) orthogonal randomized Hadamard ``H_n diag(s) / sqrt(n)``, ``s`` in {-1, +1}^n (QuaRot, section 4).

    The signs come from a ``torch.Generator`` seeded with ``seed``: the same seed gives the same matrix.
    Built in float64 and cast to ``dtype``.
    """
    H = hadamard_matrix(n, torch.float64)  # (n, n); raises InputError for an unsupported n
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 2, (n,), generator=g, dtype=torch.int64) * 2 - 1  # (n,) random signs
    return (H * s.to(torch.float64) / math.sqrt(n)).to(dtype)  # column j scaled by s[j]


def random_orthogonal(n: int, seed: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(n, n) Haar-distributed random orthogonal matrix: QR of an N(0, 1) matrix with ``Q`` times sign(diag R).

    The sign fix (Mezzadri 2007) makes the distribution exactly Haar; for offline rotations only (dense).
    Computed in float64 from a ``torch.Generator`` seeded with ``seed``, cast to ``dtype``.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise InputError(f"random_orthogonal: size {n!r} must be a positive int")
    g = torch.Generator().manual_seed(seed)
    G = torch.randn(n, n, generator=g, dtype=torch.float64)  # (n, n)
    Q, R = torch.linalg.qr(G)
    d = torch.sign(torch.diagonal(R))
    d[d == 0] = 1.0
    return (Q * d).to(dtype)  # column j times sign(R[j, j])


# ---- helpers ---------------------------------------------------------------------------------------------


def _last_dim(x: torch.Tensor, where: str) -> int:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() == 0:
        what = f"a {x.dtype} tensor of shape {tuple(x.shape)}" if isinstance(x, torch.Tensor) else type(x).__name__
        raise InputError(f"{where}: needs a floating tensor with at least one dim, got {what}")
    n = x.shape[-1]
    if n < 1:
        raise InputError(f"{where}: the last dim of shape {tuple(x.shape)} is empty (width 0)")
    return n


def _working_copy(x: torch.Tensor) -> torch.Tensor:
    """A fresh contiguous copy of ``x`` in the compute dtype (fp32 for half types)."""
    y = torch.empty(x.shape, dtype=torch.float32 if x.dtype in _HALF else x.dtype, device=x.device)
    return y.copy_(x)


def _fwht_(y: torch.Tensor) -> torch.Tensor:
    """In-place unnormalized Sylvester-order FWHT of contiguous ``y`` (..., p) along its last dim; returns y."""
    p = y.shape[-1]
    rows = y.numel() // p if p else 0
    h = 1
    while h < p and rows:
        v = y.view(rows, p // (2 * h), 2, h)  # pairs (a, b) h apart: [a, b] -> [a + b, a - b]
        a, b = v[:, :, 0, :], v[:, :, 1, :]
        t = a - b
        a.add_(b)
        b.copy_(t)
        h *= 2
    return y


def _split(n: int) -> tuple[int, int] | None:
    m = n // (n & -n)  # the odd part: m = 1 (Sylvester), else m % 4 == 0 for every Paley order
    while m <= n:
        if _is_base_order(m):
            return n // m, m
        m *= 2
    return None


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _is_base_order(m: int) -> bool:
    return m == 1 or _paley1_q(m) is not None or _paley2_q(m) is not None


def _paley1_q(m: int) -> int | None:
    q = m - 1
    return q if q % 4 == 3 and _is_prime(q) else None


def _paley2_q(m: int) -> int | None:
    q = m // 2 - 1
    return q if m % 2 == 0 and q % 4 == 1 and _is_prime(q) else None


@lru_cache(maxsize=64)
def _base_matrix(m: int) -> torch.Tensor:
    """(m, m) int64 Hadamard of base order m (Paley I preferred over II); cached, so never modify it."""
    if m == 1:
        return torch.ones(1, 1, dtype=torch.int64)
    q = _paley1_q(m)
    if q is not None:  # Paley I: H = I + [[0, 1^T], [-1, Q]], Q skew-symmetric
        S = torch.zeros(m, m, dtype=torch.int64)
        S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
        return torch.eye(m, dtype=torch.int64) + S
    q = _paley2_q(m)
    C = torch.zeros(q + 1, q + 1, dtype=torch.int64)  # Paley II: symmetric conference matrix
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
    A = torch.tensor([[1, -1], [-1, -1]], dtype=torch.int64)  # replaces the zero diagonal
    B = torch.tensor([[1, 1], [1, -1]], dtype=torch.int64)  # replaces each +-1
    return torch.kron(torch.eye(q + 1, dtype=torch.int64), A) + torch.kron(C, B)


def _jacobsthal(q: int) -> torch.Tensor:
    """(q, q) int64 ``Q[i, j] = legendre(j - i, q)``: 0 on the diagonal, +1 for quadratic residues, else -1."""
    chi = -torch.ones(q, dtype=torch.int64)
    chi[0] = 0
    chi[torch.tensor(sorted({i * i % q for i in range(1, q)}), dtype=torch.int64)] = 1
    i = torch.arange(q)
    return chi[(i[None, :] - i[:, None]) % q]


def _supported_text(n: int) -> str:
    below = next((w for w in range(n - 1, 0, -1) if _split(w)), None) if n > 1 else None
    above = next(w for w in range(max(n + 1, 1), 2 * max(n, 1) + 1) if _split(w))
    near = " and ".join(str(w) for w in (below, above) if w is not None)
    return (f"base orders up to 200: {', '.join(map(str, hadamard_base_orders(200)))} (1 = Sylvester, q + 1 for "
            f"primes q % 4 == 3, 2(q + 1) for primes q % 4 == 1); nearest supported widths: {near}")


__all__ = ["fwht", "hadamard_base_orders", "hadamard_matrix", "hadamard_order_split", "hadamard_transform",
           "is_hadamard_width", "random_hadamard", "random_orthogonal"]

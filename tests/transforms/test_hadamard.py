"""hadamard: exact Hadamard matrices for 2^k * m widths, the fast transforms equal the dense products, the
random rotations are orthogonal and seeded, and unsupported widths are refused with a helpful message."""

from __future__ import annotations

import math

import pytest
import torch

from lowbit.errors import InputError
from lowbit.hadamard import (
    fwht,
    hadamard_base_orders,
    hadamard_matrix,
    hadamard_order_split,
    hadamard_transform,
    is_hadamard_width,
    random_hadamard,
    random_orthogonal,
)

SUPPORTED_UP_TO_1024 = [n for n in range(1, 1025) if is_hadamard_width(n)]
MODEL_WIDTHS = [576, 640, 1536]  # SmolLM2 hidden, Gemma-3-270M hidden, SmolLM2 MLP
BIG = [2048, 4096]  # dense H @ H.T too costly in full: checked on sampled rows


def _assert_hadamard(H: torch.Tensor, rows: torch.Tensor | None = None) -> None:
    """Entries +-1 and H[rows] @ H.T == n I[rows] exactly. fp32 matmul of +-1 entries is exact here: every
    partial sum is an integer of magnitude <= n <= 4096 < 2^24."""
    n = H.shape[0]
    assert H.shape == (n, n) and H.dtype == torch.float32
    assert bool(((H == 1) | (H == -1)).all())
    rows = torch.arange(n) if rows is None else rows
    G = H[rows] @ H.T  # (len(rows), n)
    expected = torch.zeros_like(G)
    expected[torch.arange(len(rows)), rows] = n
    assert torch.equal(G, expected), n


def test_base_orders_up_to_200():
    assert hadamard_base_orders(200) == [1, 4, 8, 12, 20, 24, 28, 32, 36, 44, 48, 60, 68, 72, 76, 80, 84, 104,
                                         108, 124, 128, 132, 140, 148, 152, 164, 168, 180, 192, 196, 200]


@pytest.mark.parametrize("n, split", [(576, (16, 36)), (640, (32, 20)), (1536, (128, 12)), (2048, (2048, 1)),
                                      (4096, (4096, 1)), (192, (16, 12)), (12, (1, 12)), (20, (1, 20)),
                                      (36, (1, 36)), (24, (2, 12)), (1, (1, 1))])
def test_order_split(n, split):
    assert hadamard_order_split(n) == split


def test_exact_for_every_supported_width_up_to_1024():
    assert len(SUPPORTED_UP_TO_1024) == 191
    for n in SUPPORTED_UP_TO_1024:
        _assert_hadamard(hadamard_matrix(n))


@pytest.mark.parametrize("n", MODEL_WIDTHS)
def test_exact_for_model_widths(n):
    _assert_hadamard(hadamard_matrix(n))


@pytest.mark.parametrize("n", BIG)
def test_exact_for_big_widths_on_sampled_rows(n):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:60]
    rows = torch.cat([torch.tensor([0, 1, n // 2, n - 1]), perm])  # 64 rows, fixed and sampled
    _assert_hadamard(hadamard_matrix(n), rows)


def test_fwht_is_sylvester_product():
    """fp32 fwht vs the fp64 dense product: |err| <= 1e-6 * sqrt(n) * max(1, log2 n) for x ~ N(0, 1) (outputs
    are ~sqrt(n) in size; each butterfly stage adds about one fp32 rounding, 6e-8, so the bound has ~10x room)."""
    g = torch.Generator().manual_seed(0)
    for k in range(13):
        n = 1 << k
        x = torch.randn(3, 2, n, generator=g)  # (3, 2, n) fp32, any leading shape
        H = hadamard_matrix(n, torch.float64)
        y = fwht(x)
        assert y.shape == x.shape and y.dtype == torch.float32
        ref = x.double() @ H
        tol = 1e-6 * math.sqrt(n) * max(1, k)
        assert (y.double() - ref).abs().max().item() <= tol, n
        assert torch.equal(x, x.clone())  # input untouched (fwht works on a copy)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_fwht_dtypes(dtype):
    x = torch.randn(4, 256, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = fwht(x)
    assert y.dtype == dtype
    ref = (x.double() @ hadamard_matrix(256, torch.float64)).to(dtype)  # fp32 compute, one rounding at the end
    if dtype == torch.float64:
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    else:
        torch.testing.assert_close(y.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_fwht_refuses_non_power_of_two():
    with pytest.raises(InputError, match="12"):
        fwht(torch.zeros(2, 12))


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("n", [12, 20, 36, 192, 576, 640, 1536])
def test_hadamard_transform_equals_dense_and_inverts(n):
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n))  # (2, 3, n) fp32
    H = hadamard_matrix(n, torch.float64)
    y = hadamard_transform(x)
    assert y.shape == x.shape and y.dtype == torch.float32
    assert _rel(y, x.double() @ H / math.sqrt(n)) <= 1e-5
    assert _rel(hadamard_transform(x, transpose=True), x.double() @ H.T / math.sqrt(n)) <= 1e-5
    assert _rel(hadamard_transform(x, normalize=False), x.double() @ H) <= 1e-5
    assert _rel(hadamard_transform(y, transpose=True), x) <= 1e-5  # the transpose variant is the inverse
    assert _rel(hadamard_transform(hadamard_transform(x, transpose=True)), x) <= 1e-5


def test_hadamard_transform_self_inverse_for_symmetric_orders():
    for n in (1024, 36, 576):  # Sylvester and Paley II: H symmetric, so the transform is an involution
        x = torch.randn(5, n, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
        torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x, rtol=1e-12, atol=1e-12)


def test_hadamard_transform_half_and_grad():
    x = torch.randn(3, 640, generator=torch.Generator().manual_seed(3))
    yb = hadamard_transform(x.bfloat16())
    assert yb.dtype == torch.bfloat16
    assert _rel(yb, hadamard_transform(x)) <= 1e-2  # input + output bf16 roundings (2^-8 each)
    xg = x.clone().requires_grad_(True)
    hadamard_transform(xg).pow(2).sum().backward()  # orthogonal: d|xH|^2/dx = 2x
    torch.testing.assert_close(xg.grad, 2 * x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [random_hadamard, random_orthogonal])
@pytest.mark.parametrize("n", [12, 64, 576])
def test_random_rotations_orthogonal_and_seeded(make, n):
    Q = make(n, seed=0)
    assert Q.shape == (n, n) and Q.dtype == torch.float32
    torch.testing.assert_close(Q @ Q.T, torch.eye(n), rtol=0, atol=1e-5)
    assert torch.equal(Q, make(n, seed=0))
    assert not torch.equal(Q, make(n, seed=1))


def test_random_hadamard_is_signed_hadamard():
    n = 640
    Q = random_hadamard(n, seed=5, dtype=torch.float64)
    s = (Q * math.sqrt(n)) / hadamard_matrix(n, torch.float64)  # (n, n): each column one sign
    assert bool((s == s[:1]).all()) and bool((s.abs() == 1).all())


@pytest.mark.parametrize("n", [7, 14, 100, 0, -4])
def test_unsupported_widths_are_refused(n):
    with pytest.raises(InputError) as err:
        hadamard_order_split(n)
    msg = str(err.value)
    assert str(n) in msg and "12, 20, 24, 28, 32, 36, 44" in msg and "nearest supported widths" in msg
    assert not is_hadamard_width(n)
    for f in (hadamard_matrix, lambda m: random_hadamard(m, seed=0)):
        with pytest.raises(InputError):
            f(n)
    if n > 0:
        with pytest.raises(InputError, match=str(n)):
            hadamard_transform(torch.zeros(2, n))


def test_nearest_widths_in_message():
    with pytest.raises(InputError, match="nearest supported widths: 96 and 104"):
        hadamard_order_split(100)
    with pytest.raises(InputError, match="positive int"):
        hadamard_order_split(True)

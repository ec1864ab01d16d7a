"""The pure linear-algebra functions, each against numpy or an exact property."""

import numpy as np
import pytest
import torch

from precond import linalg


def spd(n, seed=0, cond=100.0):
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    lam = torch.logspace(0, np.log10(cond), n, dtype=torch.float64)
    return (Q * lam) @ Q.T, lam


@pytest.mark.parametrize("exponent", [0.5, 0.25, 1.0 / 6])
def test_inverse_root_matches_numpy(exponent):
    A, _ = spd(12)
    w, V = np.linalg.eigh(A.numpy() + 1e-3 * np.eye(12))
    expected = (V * w**-exponent) @ V.T
    got = linalg.inverse_root(A, exponent, 1e-3)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_inverse_root_shifts_a_spectrum_that_rounding_pushed_below_epsilon():
    A = torch.diag(torch.tensor([-1e-9, 1.0, 4.0], dtype=torch.float64))
    R = linalg.inverse_root(A, 0.5, 1e-6)
    # eigenvalues of A + eps I are (-1e-9 + 1e-6, 1+1e-6, 4+1e-6); lambda_min < eps so all shift by eps - lambda_min
    lam = torch.tensor([-1e-9, 1.0, 4.0], dtype=torch.float64) + 1e-6
    lam = lam - lam.min() + 1e-6
    torch.testing.assert_close(torch.diagonal(R), lam.pow(-0.5), rtol=1e-12, atol=0)


def test_newton_inverse_root_agrees_with_eigh():
    A, _ = spd(10, seed=1)
    for root in (2, 4):
        torch.testing.assert_close(linalg.inverse_root_newton(A, root, 1e-6, tolerance=1e-10),
                                   linalg.inverse_root(A, 1.0 / root, 1e-6), rtol=1e-7, atol=1e-9)


def test_inverse_sqrt_newton_schulz_agrees_with_eigh():
    A, _ = spd(8, seed=2, cond=10.0)
    torch.testing.assert_close(linalg.inverse_sqrt_newton_schulz(A, 1e-6, iterations=40),
                               linalg.inverse_root(A, 0.5, 1e-6), rtol=1e-8, atol=1e-10)


def test_off_diagonal_ratio_by_hand():
    B = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64)
    assert float(linalg.off_diagonal_ratio(B)) == pytest.approx(4.0 / 5.0)
    assert float(linalg.off_diagonal_ratio(torch.diag(torch.tensor([1.0, 2.0])))) == 0.0


def test_qr_algorithm_converges_to_the_eigen_decomposition():
    A, lam = spd(8, seed=3, cond=50.0)
    estimates, Q, iterations = linalg.qr_algorithm(A, torch.eye(8, dtype=torch.float64), 500, 1e-10)
    assert 0 < iterations <= 500
    torch.testing.assert_close(estimates, lam, rtol=1e-8, atol=0)
    # the iterate B = R'Q' drifts from QᵀAQ by round-off, so the recomputed ratio is looser than 1e-10
    assert float(linalg.off_diagonal_ratio(Q.T @ A @ Q)) < 1e-6


def test_qr_algorithm_takes_no_step_when_the_basis_already_fits():
    A, _ = spd(6, seed=4)
    _, V = torch.linalg.eigh(A)
    _, _, iterations = linalg.qr_algorithm(A, V, 10, 1e-6)
    assert iterations == 0


def test_power_qr_step_is_orthonormal_and_sorted():
    A, _ = spd(7, seed=5)
    Q0 = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))[0]
    Q, order = linalg.power_qr_step(A, Q0)
    torch.testing.assert_close(Q.T @ Q, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12)
    est = torch.diagonal(Q0.T @ A @ Q0)[order]
    assert torch.all(est[:-1] >= est[1:])


def test_symmetric_eigh_retries_in_float64(monkeypatch):
    real = torch.linalg.eigh
    calls = []

    def flaky(A):
        calls.append(A.dtype)
        if A.dtype != torch.float64:
            raise RuntimeError("simulated LAPACK failure")
        return real(A)

    monkeypatch.setattr(torch.linalg, "eigh", flaky)
    A, lam = spd(5, seed=7)
    L, Q = linalg.symmetric_eigh(A.float())
    assert calls == [torch.float32, torch.float64] and L.dtype == torch.float32
    torch.testing.assert_close(L.double(), lam, rtol=1e-5, atol=0)


def test_symmetric_eigh_raises_linalg_failure_when_both_attempts_fail(monkeypatch):
    def broken(A):
        raise RuntimeError("simulated LAPACK failure")

    monkeypatch.setattr(torch.linalg, "eigh", broken)
    with pytest.raises(linalg.LinAlgFailure):
        linalg.symmetric_eigh(torch.eye(3))
    with pytest.raises(linalg.LinAlgFailure):
        linalg.symmetric_eigh(torch.tensor([[float("nan")]]))

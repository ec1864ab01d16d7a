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
    estimates, Q, iterations, _ = linalg.qr_algorithm(A, torch.eye(8, dtype=torch.float64), 500, 1e-10)
    assert 0 < iterations <= 500
    torch.testing.assert_close(estimates, lam, rtol=1e-8, atol=0)
    # the iterate B = R'Q' drifts from QᵀAQ by round-off, so the recomputed ratio is looser than 1e-10
    assert float(linalg.off_diagonal_ratio(Q.T @ A @ Q)) < 1e-6


def test_qr_algorithm_takes_no_step_when_the_basis_already_fits():
    A, _ = spd(6, seed=4)
    _, V = torch.linalg.eigh(A)
    _, _, iterations, _ = linalg.qr_algorithm(A, V, 10, 1e-6)
    assert iterations == 0


@pytest.mark.parametrize("start_order", ["ascending", "descending"])
def test_qr_algorithm_improves_a_warm_start_in_either_order(start_order):
    # eigh's ascending order is the one an unshifted QR step makes worse unless the columns are re-sorted
    A, _ = spd(32, seed=7, cond=1e3)
    _, V = torch.linalg.eigh(A)
    g = torch.Generator().manual_seed(8)
    E = 1e-2 * torch.randn(32, 32, generator=g, dtype=torch.float64)
    Q0 = V @ torch.linalg.matrix_exp(E - E.T)
    if start_order == "descending":
        Q0 = Q0.flip(-1)
    before = float(linalg.off_diagonal_ratio(Q0.T @ A @ Q0))
    estimates, Q, _, order = linalg.qr_algorithm(A, Q0, 1, 0.0)
    assert float(linalg.off_diagonal_ratio(Q.T @ A @ Q)) < 0.5 * before
    assert bool((estimates[1:] >= estimates[:-1]).all())
    # column j of the result continues column order[j] of the start
    overlap = (linalg.permute_columns(Q0, order) * Q).sum(0).abs()
    assert float(overlap.min()) > 0.99


def test_power_qr_step_is_orthonormal_and_sorted():
    A, _ = spd(7, seed=5)
    Q0 = torch.linalg.qr(torch.randn(7, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6)))[0]
    Q, order, fell_back, _ = linalg.power_qr_step(A, Q0)
    torch.testing.assert_close(Q.T @ Q, torch.eye(7, dtype=torch.float64), rtol=0, atol=1e-12)
    est = torch.diagonal(Q0.T @ A @ Q0)[order]
    assert torch.all(est[:-1] >= est[1:])
    assert not bool(fell_back)


def power_step_and_random(dtype):
    """A power step's A·Q (A's eigenvalues over 10 decades, Q near its eigenbasis; condition 1e8) and a
    random matrix, batched."""
    g = torch.Generator().manual_seed(7)
    n = 24
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    A = V @ torch.diag(torch.logspace(-8, 2, n, dtype=torch.float64)) @ V.T
    near = torch.linalg.qr(V + 1e-3 * torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    return torch.stack([A @ near, torch.randn(n, n, generator=g, dtype=torch.float64)]).to(dtype)


def test_cholesky_qr_equals_householder_qr_up_to_column_signs():
    """float64: backward stable as Householder QR is (QᵀX upper triangular to rounding, Q orthonormal), and the
    same Q as LAPACK's column by column, up to sign, within the forward error κ(X)·u both have."""
    X = power_step_and_random(torch.float64)
    Q, ok = linalg.cholesky_qr(X)
    assert ok.tolist() == [True, True]
    unit = X / X.norm(dim=-2, keepdim=True)
    eye = torch.eye(24, dtype=torch.float64)
    assert float(torch.linalg.matrix_norm(Q.mT @ Q - eye).max()) < 1e-14
    assert float((torch.tril(Q.mT @ unit, -1).norm(dim=(-2, -1)) / unit.norm(dim=(-2, -1))).max()) < 1e-15
    H = torch.linalg.qr(X)[0]
    signs = torch.sign((Q * H).sum(-2, keepdim=True))
    kappa = torch.linalg.cond(unit)
    for b in range(2):
        assert float((Q[b] * signs[b] - H[b]).abs().max()) < 10 * float(kappa[b]) * 2.2e-16


def test_power_qr_falls_back_to_householder_where_cholesky_qr_loses_orthogonality(monkeypatch):
    """float32 at condition 1e8 (past 1/u): CholeskyQR is not orthonormal for that matrix, which takes
    Householder QR instead (counted); the well-conditioned one keeps its CholeskyQR."""
    X = power_step_and_random(torch.float32)
    Q, ok = linalg.cholesky_qr(X)
    assert ok.tolist() == [False, True]
    eye = torch.eye(24, dtype=torch.float32)
    A = torch.stack([X[0] @ X[0].mT, X[1] @ X[1].mT])  # symmetric, condition 1e16 in float32
    householder = []  # the stacks Householder QR was given
    real_qr = linalg._qr
    monkeypatch.setattr(linalg, "_qr", lambda M: householder.append(tuple(M.shape)) or real_qr(M))
    Q_step, _, fell_back, _ = linalg.power_qr_step(A, eye.expand(2, 24, 24))
    assert fell_back.tolist() == [True, False]
    assert householder == [(1, 24, 24)]
    assert float(torch.linalg.matrix_norm(Q_step.mT @ Q_step - eye).max()) < 1e-5
    # the failed matrix alone went through Householder QR; the other kept its CholeskyQR basis, bit for bit
    AQ = A @ eye  # the power step from the identity, columns sorted by their Rayleigh quotients (A's diagonal)
    order = torch.argsort(torch.diagonal(A, dim1=-2, dim2=-1), dim=-1, descending=True)
    sorted_AQ = torch.stack([AQ[b][:, order[b]] for b in range(2)])
    assert torch.equal(Q_step[0], torch.linalg.qr(sorted_AQ[0])[0])
    assert torch.equal(Q_step[1], linalg.cholesky_qr(sorted_AQ[1:])[0][0])


def test_cholesky_qr_drops_a_matrix_whose_second_factorisation_fails(monkeypatch):
    """The ill-conditioned matrix fails its second (first unshifted) Cholesky factorisation and takes no
    third pass; the other matrix's ``Q`` is what it gets alone, bit for bit; a stack where every matrix
    fails stops after two factorisations and hands ``X`` back."""
    X = power_step_and_random(torch.float32)
    solves = []  # the stack sizes each pass's triangular solve was given
    real_solve = torch.linalg.solve_triangular
    monkeypatch.setattr(torch.linalg, "solve_triangular", lambda L, B, **kw: solves.append(L.shape[0]) or
                        real_solve(L, B, **kw))
    Q, ok = linalg.cholesky_qr(X)
    assert ok.tolist() == [False, True] and solves == [2, 1, 1]
    assert torch.equal(Q[0], X[0])
    assert torch.equal(Q[1], linalg.cholesky_qr(X[1:])[0][0])
    solves.clear()
    Q, ok = linalg.cholesky_qr(X[:1])
    assert ok.tolist() == [False] and solves == [1] and torch.equal(Q, X[:1])
    # a single matrix (no stack) and a stack of stacks keep their shapes
    for given in (X[1], torch.stack([X, X])):
        Q, ok = linalg.cholesky_qr(given)
        assert Q.shape == given.shape and ok.shape == given.shape[:-2]
    assert linalg.cholesky_qr(torch.stack([X, X]))[1].tolist() == [[False, True], [False, True]]


def rotated(V, angle, seed):
    """``V`` turned by a random rotation ``exp(angle · K)`` (``K`` skew, unit spectral norm)."""
    n = V.shape[-1]
    K = torch.randn(n, n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    K = K - K.T
    return V @ torch.linalg.matrix_exp(angle * K / torch.linalg.matrix_norm(K, 2))


def test_refine_eigenbasis_converges_to_float64_eigh_from_a_nearby_basis():
    A, lam = spd(10, seed=7, cond=30.0)
    _, V = torch.linalg.eigh(A)
    X, taken = linalg.refine_eigenbasis(A, rotated(V, 0.05, seed=8), iterations=12)
    assert 0 < taken <= 12  # quadratic convergence: the ratio reaches round-off (0) within a few steps
    torch.testing.assert_close(X.T @ X, torch.eye(10, dtype=torch.float64), rtol=0, atol=1e-13)
    torch.testing.assert_close(torch.diagonal(X.T @ A @ X), lam, rtol=1e-12, atol=0)
    # same columns as eigh, up to sign: the refinement keeps the order it started from
    torch.testing.assert_close((X * V).sum(0).abs(), torch.ones(10, dtype=torch.float64), rtol=0, atol=1e-12)


def numpy_lifted_root(A, exponent, epsilon):
    """``(A + εI)^{-exponent}`` by numpy's eigh, the spectrum lifted by ``ε - λ_min`` where ``λ_min < ε``."""
    w, V = np.linalg.eigh(A.numpy() + epsilon * np.eye(A.shape[0]))
    if w.min() < epsilon:
        w = w - w.min() + epsilon
    return (V * w**-exponent) @ V.T


def test_refined_inverse_roots_are_eighs_from_an_exact_basis_and_converge_from_a_nearby_one():
    """Shampoo's ``root_method="refine"``: from the exact eigenbasis the root is numpy's (the ε lift too);
    from a rotated basis, repeated refreshes of a fixed factor converge to it."""
    A, _ = spd(10, seed=3, cond=1e4)
    A = A - 1.0001 * torch.linalg.eigvalsh(A)[0] * torch.eye(10, dtype=torch.float64)  # λ_min ≈ -1e-4·λ: lifted
    exact = numpy_lifted_root(A, 0.25, 1e-6)
    _, V = torch.linalg.eigh(A + 1e-6 * torch.eye(10, dtype=torch.float64))
    roots, Q, ok, taken = linalg.refined_inverse_roots(A[None], V[None], 0.25, 1e-6)
    assert bool(ok[0]) and int(taken[0]) <= 1
    np.testing.assert_allclose(roots[0].numpy(), exact, rtol=1e-9, atol=1e-9 * np.abs(exact).max())
    B, _ = spd(10, seed=5, cond=1e3)
    target = torch.from_numpy(numpy_lifted_root(B, 0.25, 1e-6))
    Q = rotated(torch.linalg.eigh(B)[1], 0.05, seed=6)[None]
    errors = []
    for _ in range(6):
        roots, Q, ok, _ = linalg.refined_inverse_roots(B[None], Q, 0.25, 1e-6)
        errors.append(float((roots[0] - target).norm() / target.norm()))
    # quadratic convergence until the off-diagonal ratio, read as a difference of squares, is below its
    # resolution (√ε of the dtype: 1.5e-8 in float64); the refinement stops there
    assert errors[0] > 1e-3 and errors[1] < 1e-3 and errors[2] < 1e-6, errors
    assert errors[-1] < 1e-6


def drifted_factor(n, m, steps, seed, A=None, beta=0.99):
    """An EMA of ``G Gᵀ`` over ``steps`` gradients ``n × m`` with a decaying column scale, continued from ``A``:
    the dense, partly clustered spectrum of a real Kronecker factor."""
    g = torch.Generator().manual_seed(seed)
    A = torch.zeros(n, n, dtype=torch.float64) if A is None else A.clone()
    for _ in range(steps):
        G = torch.randn(n, m, dtype=torch.float64, generator=g) * torch.logspace(0, -1, m, dtype=torch.float64)
        A = beta * A + (1 - beta) * G @ G.T
    return A


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("m, drift", [(16, 1), (48, 5), (128, 20)])
def test_refine_eigenbasis_tracks_a_drifting_factor_better_than_power_qr(dtype, m, drift):
    """The basis of a factor, then ``drift`` more EMA steps: one refinement gets closer to the new eigenbasis
    than SOAP's power-QR step, further steps keep shrinking the criterion, and the basis stays orthonormal."""
    before = drifted_factor(48, m, 100, seed=0)
    X = torch.linalg.eigh(before)[1]
    A = drifted_factor(48, m, drift, seed=1, A=before)
    power_qr, _, _, _ = linalg.power_qr_step(A, X)
    ratios = [float(linalg.off_diagonal_ratio(power_qr.T @ A @ power_qr))]
    for _ in range(4):
        X, _ = linalg.refine_eigenbasis(A.to(dtype), X.to(dtype), iterations=1)
        X = X.double()
        ratios.append(float(linalg.off_diagonal_ratio(X.T @ A @ X)))
        orthogonality = float((X.T @ X - torch.eye(48, dtype=torch.float64)).abs().max())
        assert orthogonality < 2e-5  # (3/4)(‖W‖⁴/4)² left by the final Newton–Schulz step at ‖W‖₂ ≤ 0.5
    assert all(b < 0.9 * a for a, b in zip(ratios, ratios[1:])), ratios


def test_refine_eigenbasis_is_batched_and_stops_each_matrix_at_the_tolerance():
    A = torch.stack([spd(12, seed=s, cond=20.0)[0] for s in range(3)])
    V = torch.linalg.eigh(A)[1]
    X0 = torch.stack([V[0], rotated(V[1], 0.2, seed=11), rotated(V[2], 0.02, seed=12)])
    X, taken = linalg.refine_eigenbasis(A, X0, iterations=20, tolerance=1e-6)
    assert taken[0] == 0 and 0 < taken[2] < taken[1] < 20
    for b in range(3):
        alone, _ = linalg.refine_eigenbasis(A[b], X0[b], iterations=int(taken[b]))
        torch.testing.assert_close(X[b], alone, rtol=0, atol=1e-13)
        assert float(linalg.off_diagonal_ratio(X[b].T @ A[b] @ X[b])) <= 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_spectral_norm_estimate_rescaled_every_fourth_product_equals_rescaling_every_one(dtype):
    """The refinement's rotation bound estimates ``‖W‖₂`` rescaling ``v`` only every fourth product: the same
    estimate to rounding as rescaling after each (a power iteration's direction does not depend on its
    scale), a lower bound of the true norm close to it, and finite at the refinement's largest ``W`` (every
    entry at ``max_angle``, the worst growth between rescalings) and at one so small that ``v`` underflows."""
    g = torch.Generator().manual_seed(3)
    B = 0.05 * torch.rand(6, 300, 300, generator=g, dtype=torch.float64) * 2 - 0.05
    W = (B - B.mT).clamp(-0.05, 0.05).to(dtype)  # antisymmetric, clipped as in refine_eigenbasis
    every = linalg._spectral_norm_estimate(W)
    fourth = linalg._spectral_norm_estimate(W, normalize_every=4)
    torch.testing.assert_close(fourth, every, rtol=1e-5 if dtype == torch.float32 else 1e-12, atol=0)
    true = torch.linalg.matrix_norm(W.double(), ord=2)[..., None, None]
    assert bool((fourth.double() <= true * (1 + 1e-5)).all()) and bool((fourth.double() >= 0.9 * true).all())
    n = 4096
    worst = torch.full((1, n, n), 0.05, dtype=torch.float32).triu(1)
    worst = worst - worst.mT
    big = linalg._spectral_norm_estimate(worst, normalize_every=4)
    assert bool(torch.isfinite(big).all()) and float(big) <= float(torch.linalg.matrix_norm(worst, ord="fro"))
    tiny = linalg._spectral_norm_estimate(1e-12 * worst[:, :64, :64], normalize_every=4)
    assert bool(torch.isfinite(tiny).all()) and float(tiny) < 1e-9


def test_finite_bases_refuses_a_basis_with_an_infinite_or_nan_entry():
    Q = torch.eye(5, dtype=torch.float32).expand(4, 5, 5).clone()
    Q[1, 2, 3], Q[2, 0, 0] = float("inf"), float("nan")
    assert linalg.finite_bases(Q).tolist() == [True, False, False, True]
    assert linalg.finite_bases(Q.double()).tolist() == [True, False, False, True]


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


def test_spectral_normalize_keeps_zero_blocks_and_low_precision():
    x = torch.randn(3, 4, 2, 3, dtype=torch.float64)
    x[1] = 0.0
    y = linalg.spectral_normalize(x)
    assert torch.equal(y[1], x[1])
    norms = torch.linalg.matrix_norm(y.reshape(3, 4, 6), ord=2)
    target = torch.full((2,), (4 / 6) ** 0.5, dtype=torch.float64)
    torch.testing.assert_close(norms[[0, 2]], target, rtol=1e-2, atol=0)
    assert (norms[[0, 2]] >= (4 / 6) ** 0.5 * (1 - 1e-12)).all()  # the estimate never exceeds the true norm
    low = linalg.spectral_normalize(x.to(torch.bfloat16))
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.double(), y, rtol=2e-2, atol=2e-2)


def test_power_qr_tries_float64_before_householder_where_float64_keeps_pace(monkeypatch):
    """A trained factor's power step is often past float32's reach and within float64's: where float64
    keeps float32's pace (a data-centre GPU; pretended here), such a matrix is orthonormalised by CholeskyQR
    in float64, not Householder QR, and is float64 Householder QR's basis up to column signs; a matrix with a
    zero column (a byte never seen: rank-deficient in any precision) still takes Householder QR. Elsewhere
    (the CPU as it is) both take Householder QR, as before."""
    g = torch.Generator().manual_seed(3)
    n = 24
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    A = V @ torch.diag(torch.logspace(-8, 2, n, dtype=torch.float64)) @ V.T  # A·I: condition 8e9, unit columns
    singular = A.clone()
    singular[-1], singular[:, -1] = 0.0, 0.0
    A = torch.stack([A, singular]).float()
    eye = torch.eye(n).expand(2, n, n)
    assert linalg.cholesky_qr(A)[1].tolist() == [False, False]  # float32's CholeskyQR fails both
    householder = []  # the stacks Householder QR was given
    real_qr = linalg._qr
    monkeypatch.setattr(linalg, "_qr", lambda M: householder.append(tuple(M.shape)) or real_qr(M))
    _, _, fell_back, _ = linalg.power_qr_step(A, eye)
    assert fell_back.tolist() == [True, True] and householder == [(2, n, n)]  # on a CPU, as before
    householder.clear()
    monkeypatch.setattr(linalg, "_float64_keeps_pace", lambda X: True)
    Q, order, fell_back, _ = linalg.power_qr_step(A, eye)
    assert fell_back.tolist() == [False, True] and householder == [(1, n, n)]
    assert Q.dtype == torch.float32
    assert float(torch.linalg.matrix_norm(Q.double().mT @ Q.double() - torch.eye(n, dtype=torch.float64)).max()) < 1e-5
    X = A[0].double()[:, order[0]]  # the power step from the identity, columns sorted
    H = torch.linalg.qr(X)[0]
    signs = torch.sign((Q[0].double() * H).sum(-2, keepdim=True))
    assert float((Q[0].double() * signs - H).abs().max()) < 1e-6  # float64's basis, rounded to float32


def test_power_qr_sends_the_flagged_matrices_straight_to_the_retry(monkeypatch):
    """``retry_first``: a flagged matrix takes no CholeskyQR in its own precision (it goes where a failure
    would have sent it: Householder QR on a CPU) and is not counted as a CholeskyQR failure; the others are
    as without the flag, bit for bit, and their failures are counted."""
    g = torch.Generator().manual_seed(5)
    n = 16
    V = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]
    hard = (V @ torch.diag(torch.logspace(-8, 2, n, dtype=torch.float64)) @ V.T).float()  # fails in float32
    easy = spd(n, 6)[0].float()
    A = torch.stack([hard, easy, hard, easy])
    eye = torch.eye(n).expand(4, n, n)
    plain_Q, plain_order, plain_fell, plain_failed = linalg.power_qr_step(A, eye)
    assert plain_failed.tolist() == [True, False, True, False] and plain_fell.tolist() == [True, False, True, False]
    shapes = []  # the stacks CholeskyQR was given
    real = linalg.cholesky_qr
    monkeypatch.setattr(linalg, "cholesky_qr", lambda X: shapes.append(X.shape[0]) or real(X))
    flagged = torch.tensor([True, True, False, False])
    Q, order, fell_back, failed = linalg.power_qr_step(A, eye, retry_first=flagged)
    assert shapes == [2]  # matrices 2 and 3 only
    assert failed.tolist() == [False, False, True, False]  # a flagged matrix was not tried, so did not fail
    assert fell_back.tolist() == [True, True, True, False]  # both flagged ones took Householder QR (CPU)
    assert torch.equal(order, plain_order)
    assert torch.equal(Q[0], plain_Q[0]) and torch.equal(Q[2], plain_Q[2])  # Householder QR's either way
    assert torch.equal(Q[1], torch.linalg.qr(A[1] @ eye[1][:, order[1]])[0])  # the easy one, by Householder
    assert torch.equal(Q[3], linalg.cholesky_qr(A[3:4] @ eye[3][:, order[3]])[0][0])  # unflagged: as before
    assert torch.equal(linalg.power_qr_step(A, eye, retry_first=torch.zeros(4, dtype=torch.bool))[0], plain_Q)

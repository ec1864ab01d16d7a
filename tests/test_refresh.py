"""The eigenbasis refresh policy: fixed, adaptive (τ), eigh / QR / power-QR, and its counters."""

import pytest
import torch

import precond
from precond.kronecker import STATS_WIDTH
from precond.refresh import EigenbasisRefresh, refresh_due


def counters():
    """A bucket of one block's counters (precond.engine.STATS_FIELDS)."""
    return torch.zeros(1, STATS_WIDTH, dtype=torch.int64)


REFRESHES, SKIPPED, QR_ITERATIONS, FAILURES = 1, 2, 3, 4
ONE = torch.ones(1, dtype=torch.bool)


def refresh(policy, A, Q, c):
    """One matrix through the batched policy: ``(new Q, order, changed)`` for that matrix."""
    Q_new, order, changed = policy.refresh(A.unsqueeze(0), Q.unsqueeze(0), c, ONE)
    return Q_new[0], order[0], bool(changed[0])


def spd(n, seed):
    X = torch.randn(n, 3 * n, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return X @ X.T


def test_adaptive_policy_skips_when_the_basis_still_fits_and_recomputes_when_it_does_not():
    A = spd(6, 0)
    _, V = torch.linalg.eigh(A)
    c = counters()
    policy = EigenbasisRefresh("eigh", tolerance=0.01)
    Q, _, changed = refresh(policy, A, V, c)
    assert torch.equal(Q, V) and not changed and c[0, SKIPPED] == 1 and c[0, REFRESHES] == 0
    Q, _, changed = refresh(policy, A, torch.eye(6, dtype=torch.float64), c)   # identity is far from the eigenbasis
    assert changed and c[0, REFRESHES] == 1
    torch.testing.assert_close(Q.T @ A @ Q, torch.diag(torch.linalg.eigvalsh(A)), rtol=0, atol=1e-9)


def test_qr_refresh_counts_iterations_and_stops_at_tolerance():
    A = spd(6, 1)
    c = counters()
    Q, _, _ = refresh(EigenbasisRefresh("qr", tolerance=1e-3, max_iterations=200), A, torch.eye(6, dtype=torch.float64), c)
    assert 0 < c[0, QR_ITERATIONS] <= 200 and c[0, REFRESHES] == 1
    B = Q.T @ A @ Q
    off = torch.sqrt(B.square().sum() - torch.diagonal(B).square().sum()) / B.norm()
    assert float(off) <= 1e-3 * 1.01


def test_power_qr_refresh_returns_the_order_it_sorted_by():
    A = spd(5, 2)
    c = counters()
    Q0 = torch.eye(5, dtype=torch.float64)
    Q, order, _ = refresh(EigenbasisRefresh("power_qr", descending=True), A, Q0, c)
    assert torch.equal(order, torch.argsort(torch.diagonal(A), descending=True))
    torch.testing.assert_close(Q.T @ Q, torch.eye(5, dtype=torch.float64), rtol=0, atol=1e-12)


def test_a_factor_whose_cholesky_qr_keeps_failing_tries_it_at_every_fourth_refresh(monkeypatch):
    """Power-QR's counters choose: a factor past float32's CholeskyQR (condition 1e10) fails at its first
    refresh, then skips it while its failures exceed a quarter of its refreshes, trying again at refreshes 5
    and 9; a well-conditioned factor beside it tries (and passes) every time. Every refresh still counts."""
    from precond import linalg
    from precond.refresh import CHOLESKY_FAILURES, FALLBACKS
    V = torch.linalg.qr(torch.randn(12, 12, dtype=torch.float64, generator=torch.Generator().manual_seed(1)))[0]
    hard = V @ torch.diag(torch.logspace(-8, 2, 12, dtype=torch.float64)) @ V.T
    A = torch.stack([hard, spd(12, 3)]).float()
    c = torch.zeros(2, STATS_WIDTH, dtype=torch.int64)
    tried = []  # per refresh, how many matrices CholeskyQR was given
    real = linalg.cholesky_qr
    monkeypatch.setattr(linalg, "cholesky_qr", lambda X: tried.append(X.shape[0]) or real(X))
    policy, Q = EigenbasisRefresh("power_qr", descending=True), torch.eye(12).expand(2, 12, 12)
    for _ in range(10):
        policy.refresh(A, Q, c, torch.ones(2, dtype=torch.bool))
    assert tried == [2, 1, 1, 1, 2, 1, 1, 1, 2, 1]
    assert c[:, REFRESHES].tolist() == [10, 10] and c[:, FAILURES].tolist() == [0, 0]
    assert c[:, CHOLESKY_FAILURES].tolist() == [3, 0] and c[:, FALLBACKS].tolist() == [10, 0]


def test_refine_refresh_counts_iterations_keeps_the_column_order_and_meets_the_tolerance():
    A = spd(6, 3)
    _, V = torch.linalg.eigh(A)
    K = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    start = V @ torch.linalg.matrix_exp(0.05 * (K - K.T))
    c = counters()
    Q, order, changed = refresh(EigenbasisRefresh("refine", tolerance=1e-8, max_iterations=50, descending=True),
                                A, start, c)
    assert changed and c[0, REFRESHES] == 1 and 0 < c[0, QR_ITERATIONS] < 50
    assert torch.equal(order, torch.arange(6))                 # no re-sorting, whatever ``descending`` says
    B = Q.T @ A @ Q
    # the off-diagonal part directly: sqrt(‖B‖² − ‖diag B‖²) cancels to ~1e-8 in float64 by itself
    assert float((B - torch.diag(torch.diagonal(B))).norm() / B.norm()) <= 1e-8
    torch.testing.assert_close((Q * V).sum(0).abs(), torch.ones(6, dtype=torch.float64), rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", ["refine", "power_qr"])
def test_matmul_refreshes_under_the_criterion_select_without_reading_the_mask_on_the_host(method, monkeypatch):
    """A bucket of four factors, two whose bases pass τ and two that drifted: the matmul methods compute the
    whole bucket and select (no ``nonzero``), leaving the passing bases exactly as they were and giving the
    drifted ones what the method gives them alone; ``eigh`` gathers the drifted ones."""
    A = torch.stack([spd(6, s) for s in range(4)])
    V = torch.linalg.eigh(A).eigenvectors.flip(-1)
    K = torch.randn(4, 6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    drift = torch.tensor([0.0, 0.3, 0.0, 0.3], dtype=torch.float64)[:, None, None]
    Q = V @ torch.linalg.matrix_exp(drift * (K - K.mT))
    c = torch.zeros(4, STATS_WIDTH, dtype=torch.int64)
    policy = EigenbasisRefresh(method, tolerance=0.01, descending=True)
    alone = [policy.refresh(A[i:i + 1], Q[i:i + 1], torch.zeros(1, STATS_WIDTH, dtype=torch.int64), ONE[:1])[0][0]
             for i in (1, 3)]

    def no_host_read(*args, **kwargs):
        raise AssertionError("the mask was read on the host")

    monkeypatch.setattr(torch.Tensor, "nonzero", no_host_read)
    new, _, changed = policy.refresh(A, Q, c, torch.ones(4, dtype=torch.bool))
    assert changed.tolist() == [False, True, False, True]
    assert torch.equal(new[0], Q[0]) and torch.equal(new[2], Q[2])
    torch.testing.assert_close(new[1], alone[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(new[3], alone[1], rtol=0, atol=1e-12)
    assert c[:, SKIPPED].tolist() == [1, 0, 1, 0] and c[:, REFRESHES].tolist() == [0, 1, 0, 1]

    def off_diagonal(Q, A):  # ‖QᵀAQ - diag‖_F / ‖QᵀAQ‖_F, written out here
        B = Q.mT @ A @ Q
        return float((B - torch.diag(torch.diagonal(B))).norm() / B.norm())

    for i in (1, 3):  # the recomputed bases diagonalise their factors better (one damped refine step: a little)
        assert off_diagonal(new[i], A[i]) < off_diagonal(Q[i], A[i])
    with pytest.raises(AssertionError, match="host"):
        EigenbasisRefresh("eigh", tolerance=0.01).refresh(A, Q, c, torch.ones(4, dtype=torch.bool))


def test_a_refresh_of_a_non_finite_factor_keeps_the_basis_and_counts_a_failure():
    A = spd(4, 4)
    A[0, 1] = A[1, 0] = float("nan")
    Q0 = torch.eye(4, dtype=torch.float64)
    for method in ("refine", "power_qr", "eigh"):
        c = counters()
        Q, _, changed = refresh(EigenbasisRefresh(method), A, Q0, c)
        assert torch.equal(Q, Q0) and not changed and c[0, FAILURES] == 1 and c[0, REFRESHES] == 0


def train_counts(opt_factory, steps=24):
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(6, 5))
    opt = opt_factory([p])
    for i in range(steps):
        p.grad = torch.randn(6, 5, generator=torch.Generator().manual_seed(i)) + 0.1 * p.detach()
        opt.step()
    return opt.preconditioner_stats()["factors"]


@pytest.mark.parametrize("make", [
    lambda tau: (lambda ps: precond.EShampoo(ps, precondition_frequency=2, merge_dims=False, refresh_tolerance=tau)),
    lambda tau: (lambda ps: precond.SOAP(ps, precondition_frequency=2, refresh_tolerance=tau)),
    lambda tau: (lambda ps: precond.EShampoo(ps, precondition_frequency=2, merge_dims=False, refresh_tolerance=tau,
                                             refresh_method="refine", max_qr_iterations=5)),
    lambda tau: (lambda ps: precond.SOAP(ps, precondition_frequency=2, refresh_tolerance=tau, refresh_method="refine",
                                         max_qr_iterations=5)),
], ids=["EShampoo", "SOAP", "EShampoo-refine", "SOAP-refine"])
def test_tolerance_sets_how_often_each_factor_recomputes(make):
    always = train_counts(make(0.0))
    never = train_counts(make(1.0))
    some = train_counts(make(0.1))
    for a, n, s in zip(always, never, some):
        opportunities = a["refreshes"] + a["skipped"]
        assert a["skipped"] == 0 and opportunities >= 11
        assert n["skipped"] >= opportunities - 1          # tau = 1: every check passes (SOAP's first eigh aside)
        assert 0 < s["refreshes"] < a["refreshes"] and s["skipped"] > 0
        assert n["failures"] == a["failures"] == s["failures"] == 0


@pytest.mark.parametrize("method", ["qr", "refine"])
def test_eshampoo_iterative_refresh_converges_to_the_factor_eigenbasis(method):
    """Many QR iterations at a tight tolerance leave each factor's basis diagonalising that factor.
    (Trajectories are not compared: EShampoo's first steps are sign-like, ``G'/|G'|``, so round-off
    residuals off the diagonal of ``G'`` are amplified to O(1) in either method.)"""
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(5, 6, dtype=torch.float64))
    # refine stalls at round-off above τ = 1e-10 and would use every iteration it is allowed: 200 suffice
    opt = precond.EShampoo([p], lr=0.01, betas=(0.9, 0.999), epsilon=1e-8, precondition_frequency=1,
                           merge_dims=False, refresh_method=method, max_qr_iterations=5000 if method == "qr" else 200,
                           refresh_tolerance=1e-10)
    for i in range(8):
        p.grad = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(i))
        opt.step()
    state = opt.state[p]
    bias2 = 1 - 0.999**8
    for i in range(2):
        factor, Q, stats = state[f"factor{i}"], state[f"basis{i}"], state[f"stats{i}"]
        A = factor / bias2 + 1e-8 * torch.eye(factor.shape[0], dtype=torch.float64)
        B = Q.T @ A @ Q
        off = torch.sqrt((B.square().sum() - torch.diagonal(B).square().sum()).clamp(min=0)) / B.norm()
        assert float(off) < 1e-6  # the in-loop iterate drifts from QᵀAQ by round-off
        torch.testing.assert_close(torch.diagonal(B).sort().values, torch.linalg.eigvalsh(A), rtol=1e-8, atol=1e-12)
        assert stats[REFRESHES] == 8 and stats[QR_ITERATIONS] > 8


@pytest.mark.parametrize("method", ["power_qr", "qr"])
def test_eshampoo_sorting_refresh_permutes_the_corrected_eigenvalues_with_the_columns(method):
    p = torch.nn.Parameter(torch.zeros(4, 3, dtype=torch.float64))
    opt = precond.EShampoo([p], refresh_method=method, merge_dims=False, precondition_1d=True,
                           max_preconditioner_dim=3, large_dim_policy="identity")  # one factor, on dim 1
    p.grad = torch.zeros(4, 3, dtype=torch.float64)
    opt.step()  # builds the bucket
    (bucket,) = opt._buckets
    A = torch.diag(torch.tensor([1.0, 5.0, 3.0], dtype=torch.float64))
    eigenvalues = torch.arange(12, dtype=torch.float64).reshape(4, 3)
    bucket.state["factor1"].copy_(A)
    bucket.state["eigenvalues"].copy_(eigenvalues)
    opt.preconditioner.refresh(bucket, torch.ones(1, dtype=torch.float64), ONE, opt.param_groups[0])
    # power-QR sorts the columns by decreasing diag(QᵀAQ); the QR algorithm by EShampoo's increasing order
    order = torch.tensor([1, 2, 0] if method == "power_qr" else [0, 2, 1])
    assert torch.equal(opt.state[p]["eigenvalues"], eigenvalues[:, order])
    torch.testing.assert_close(opt.state[p]["basis1"].abs(), torch.eye(3, dtype=torch.float64)[:, order],
                               rtol=0, atol=1e-6)


def test_a_tensor_learning_rate_is_accepted():
    p = torch.nn.Parameter(torch.ones(3, 3))
    opt = precond.SOAP([p], lr=torch.tensor(0.01))
    for _ in range(2):
        p.grad = torch.ones(3, 3)
        opt.step()
    assert torch.isfinite(p).all() and not torch.equal(p.detach(), torch.ones(3, 3))


@pytest.mark.parametrize("frequency, start, due", [
    (1, 1, list(range(1, 25))),          # every step (Shampoo's default)
    (3, 5, [5, 6, 9, 12, 15, 18, 21, 24]),  # Shampoo: the start, then each multiple of F after it
    (10, 10, [10, 20]),                  # SOAP (counted from its first update) and Sophia (update_period)
    (4, 0, [0, 4, 8, 12, 16, 20, 24]),   # ASGO (counted from calls - 1: its first step has a root)
])
def test_refresh_due_is_the_start_then_every_multiple_after_it(frequency, start, due):
    assert [t for t in range(0, 25) if refresh_due(t, frequency, start)] == due


@pytest.mark.parametrize("cls", [precond.SOAP, precond.EShampoo])
@pytest.mark.parametrize("option, value", [("refresh_tolerance", 2.0), ("refresh_method", "svd"),
                                           ("max_qr_iterations", 0)])
def test_refresh_options_are_checked_in_the_constructor_and_in_every_param_group(cls, option, value):
    p, q = torch.nn.Parameter(torch.randn(4, 4)), torch.nn.Parameter(torch.randn(3, 3))
    with pytest.raises(ValueError, match=f"Invalid {option}"):
        cls([p], **{option: value})
    with pytest.raises(ValueError, match=f"Invalid {option}: .* in param group 1"):
        cls([{"params": [p]}, {"params": [q], option: value}])

"""Pure linear-algebra functions shared by every preconditioner.

Nothing here keeps state, and every function takes stacks of matrices (``[..., n, n]``), so that a bucket
of same-shaped blocks is one batched call. Batched functions report failures as per-matrix masks; the
single-matrix helpers raise :class:`LinAlgFailure`. Either way the caller keeps its last good result and
counts the failure.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .precision import matmul, matmul_epsilon, tf32_matmuls

__all__ = [
    "LinAlgFailure",
    "tf32_matmuls",
    "symmetric_eigh",
    "batched_eigh",
    "inverse_roots",
    "refined_inverse_roots",
    "shifted_eigh",
    "spectral_function",
    "pseudo_inverse_roots",
    "inverse_root",
    "permute_columns",
    "off_diagonal_ratio",
    "finite_bases",
    "qr_algorithm",
    "power_qr_step",
    "cholesky_qr",
    "refine_eigenbasis",
    "inverse_sqrt_newton_schulz",
    "inverse_root_newton",
    "spectral_normalize",
]


class LinAlgFailure(RuntimeError):
    """A decomposition failed, in the working precision and again in float64."""


def symmetric_eigh(A: Tensor) -> tuple[Tensor, Tensor]:
    """Eigen-decomposition of a symmetric matrix, eigenvalues ascending.

    Retries in float64 when the first attempt raises or returns non-finite values (cuSOLVER and LAPACK
    both fail on ill-conditioned float32 input now and then); raises :class:`LinAlgFailure` if that fails too.
    """
    if not torch.isfinite(A).all():
        raise LinAlgFailure("matrix has non-finite entries")
    try:
        L, Q = torch.linalg.eigh(A)
        if torch.isfinite(L).all() and torch.isfinite(Q).all():
            return L, Q
    except RuntimeError:
        pass
    try:
        L, Q = torch.linalg.eigh(A.to(torch.float64))
    except RuntimeError as err:
        raise LinAlgFailure(f"eigh failed in float64: {err}") from err
    if not (torch.isfinite(L).all() and torch.isfinite(Q).all()):
        raise LinAlgFailure("eigh returned non-finite values in float64")
    return L.to(A.dtype), Q.to(A.dtype)


def batched_eigh(A: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Eigen-decompositions of a stack of symmetric matrices ``[B, n, n]``: ``(L, Q, ok)``.

    One batched call; only if it raises, or returns non-finite values for some matrices, are those
    retried one by one through :func:`symmetric_eigh` (float64 retry). ``ok[b]`` is False where even that
    failed; there ``L`` and ``Q`` hold zeros and the identity, and the caller keeps its last good result.
    Checking for failures reads one flag on the host.
    """
    try:
        L, Q = torch.linalg.eigh(A)
        ok = torch.isfinite(L).all(-1) & torch.isfinite(Q).flatten(-2).all(-1)
        if bool(ok.all()):
            return L, Q, ok
    except RuntimeError:
        L = torch.zeros(A.shape[:-1], dtype=A.dtype, device=A.device)
        Q = torch.eye(A.shape[-1], dtype=A.dtype, device=A.device).expand_as(A).clone()
        ok = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    for b in (~ok).nonzero().flatten().tolist():
        try:
            L[b], Q[b] = symmetric_eigh(A[b])
            ok[b] = True
        except LinAlgFailure:
            L[b], Q[b] = 0.0, torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    return L, Q, ok


def inverse_roots(A: Tensor, exponent: float, epsilon: float) -> tuple[Tensor, Tensor]:
    r"""``(A_b + εI)^{-exponent}`` for a stack ``[B, n, n]`` of symmetric PSD matrices: ``(roots, ok)``.

    With ``A + εI = Q diag(λ) Qᵀ``: if rounding left ``λ_min < ε`` the spectrum is shifted to
    ``λ - λ_min + ε`` (so every eigenvalue is at least ε), then ``Q diag(λ^{-exponent}) Qᵀ``.
    This is the perturbation rule of Distributed Shampoo's default root-inverse configuration.
    """
    L, Q, ok = shifted_eigh(A, epsilon)
    return spectral_function(Q, L.pow(-exponent), ok)


def refined_inverse_roots(A: Tensor, Q: Tensor, exponent: float, epsilon: float,
                          iterations: int = 1) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""``(A_b + εI)^{-exponent}`` through a warm-started eigenbasis, matmul only: ``(roots, bases, ok, taken)``.

    With ``M = A + εI`` and ``Q`` the basis of the last refresh, ``Q`` is refined (``iterations`` steps of
    :func:`refine_eigenbasis`), the eigenvalues are estimated as ``λ = diag(QᵀMQ)``, shifted as
    :func:`inverse_roots` shifts them (so that ``λ_min ≥ ε``), and the root is ``Q diag(λ^{-exponent}) Qᵀ``:
    Distributed Shampoo's eigendecomposed root with a warm-started decomposition, as its QR config does, here
    with the refinement that batches on a GPU. Exact where ``Q`` diagonalises ``M``; otherwise the error is
    that of the basis, which each refresh shrinks. ``ok`` is False where the basis or the root came out
    non-finite (the caller keeps the last good ones); ``taken``: refinement steps per matrix.
    """
    M = A + epsilon * torch.eye(A.shape[-1], dtype=A.dtype, device=A.device)
    Q, taken = refine_eigenbasis(M, Q, iterations)
    L = _lifted((matmul(M, Q) * Q).sum(-2), epsilon)  # diag(QᵀMQ), one product
    roots, ok = spectral_function(Q, L.pow(-exponent), finite_bases(Q))
    return roots, Q, ok, taken


def pseudo_inverse_roots(A: Tensor, exponent: float, rank_rtol: float | None = None) -> tuple[Tensor, Tensor]:
    r"""``A_b^{+exponent}``, the pseudo-inverse root of each PSD matrix of a stack ``[B, n, n]``: ``(roots, ok)``.

    Eigenvalues at or below ``rank_rtol · λ_max`` (``None``: ``n · machine epsilon``, the rule of
    ``torch.linalg.matrix_rank`` and of Distributed Shampoo's ``PseudoInverseConfig``) count as zero and
    get a zero root, so a rank-deficient factor leaves its null space alone instead of amplifying it by
    ``ε^{-exponent}``; an all-zero factor gives a zero root.
    """
    L, Q, ok = batched_eigh(A)
    rtol = A.shape[-1] * torch.finfo(A.dtype).eps if rank_rtol is None else rank_rtol
    cutoff = rtol * L.max(-1, keepdim=True).values.clamp(min=0.0)
    kept = L > cutoff
    powers = torch.where(kept, L.clamp(min=torch.finfo(A.dtype).tiny).pow(-exponent), 0.0)
    return spectral_function(Q, powers, ok)


def spectral_function(Q: Tensor, values: Tensor, ok: Tensor) -> tuple[Tensor, Tensor]:
    """``Q diag(values) Qᵀ`` per matrix of a stack, and ``ok`` cleared where the result is not finite."""
    roots = matmul(Q * values.unsqueeze(-2), Q.mT)
    return roots, ok & torch.isfinite(roots).flatten(-2).all(-1)


def shifted_eigh(A: Tensor, epsilon: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`batched_eigh` of ``A + εI`` with the spectrum shifted so that every eigenvalue is at least ε
    (the rule of :func:`inverse_roots`): ``(L, Q, ok)``."""
    n = A.shape[-1]
    L, Q, ok = batched_eigh(A + epsilon * torch.eye(n, dtype=A.dtype, device=A.device))
    return _lifted(L, epsilon), Q, ok


def _lifted(L: Tensor, epsilon: float) -> Tensor:
    """Eigenvalues ``[..., n]`` of ``A + εI`` shifted by ``ε - λ_min`` where rounding left ``λ_min < ε``
    (Distributed Shampoo's perturbation rule)."""
    lam_min = L.min(-1, keepdim=True).values
    return torch.where(lam_min < epsilon, L - lam_min + epsilon, L)


def inverse_root(A: Tensor, exponent: float, epsilon: float) -> Tensor:
    """:func:`inverse_roots` of one matrix; raises :class:`LinAlgFailure` if it fails."""
    roots, ok = inverse_roots(A.unsqueeze(0), exponent, epsilon)
    if not bool(ok[0]):
        raise LinAlgFailure("inverse root failed")
    return roots[0]


def finite_bases(Q: Tensor) -> Tensor:
    """``[B]`` bools: which bases of a stack ``[B, n, n]`` are finite, by one norm each (two operators, where an
    elementwise ``isfinite`` and its reduction take five). A basis has entries of order one, so its norm
    overflows only where an entry is infinite or NaN (or absurd: such a basis is refused as well)."""
    norms = torch.linalg.vector_norm(Q.flatten(1), dim=1)
    return norms <= torch.finfo(norms.dtype).max


def off_diagonal_ratio(B: Tensor) -> Tensor:
    r"""``‖B - diag(B)‖_F / ‖B‖_F`` of each matrix in ``[..., n, n]``: how far ``B = QᵀAQ`` is from diagonal.

    ``‖A - Q diag(B) Qᵀ‖_F = ‖B - diag(B)‖_F`` and ``‖B‖_F = ‖A‖_F``, so this is the relative error of
    approximating ``A`` in the basis ``Q`` ("Purifying Shampoo", Eschenhagen et al. 2025).
    """
    off, total = _off_diagonal_norms(B)
    return off / torch.clamp(total, min=torch.finfo(B.dtype).tiny)


def _off_diagonal_norms(B: Tensor) -> tuple[Tensor, Tensor]:
    """``(‖B - diag(B)‖_F, ‖B‖_F)`` of each matrix in ``[..., n, n]``, from two reductions (no masked copy)."""
    total = torch.linalg.matrix_norm(B)
    diag = torch.linalg.vector_norm(torch.diagonal(B, dim1=-2, dim2=-1), dim=-1)
    return torch.sqrt(torch.clamp(total.square() - diag.square(), min=0.0)), total


def permute_columns(Q: Tensor, order: Tensor) -> Tensor:
    """``Q[..., :, order]`` for each matrix of a stack, ``order`` of shape ``[..., n]``."""
    return Q.gather(-1, order.unsqueeze(-2).expand_as(Q))


def qr_algorithm(A: Tensor, Q: Tensor, max_iterations: int, tolerance: float,
                 B: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""Warm-started QR algorithm for the eigenbases of symmetric matrices ``A`` (``[..., n, n]``).

    ``B = QᵀAQ``, its rows and columns (and ``Q``'s columns) first sorted by ``diag(B)`` descending; then,
    while fewer than ``max_iterations`` steps were taken and ``off_diagonal_ratio(B) > tolerance``:
    ``Q', R' = qr(B); B = R'Q'; Q = Q Q'``, each matrix of a stack stopping on its own (the loop ends early
    once all have converged, a host read per iteration). The estimates ``diag(B)`` are then sorted ascending
    (stable) and ``Q``'s columns permuted alike.

    Why the first sort: an unshifted QR step scales the entry ``B[i, j]`` below the diagonal by about
    ``λᵢ/λⱼ``, so it shrinks the off-diagonal part only when the diagonal decreases; from a basis ordered
    ascending (as ``eigh`` returns it) each step would rotate the columns away from the eigenvectors.
    ``B`` may be passed in when the caller already computed ``QᵀAQ``.
    Returns ``(eigenvalue estimates, Q, iterations taken, order)``: column ``j`` of the returned ``Q``
    continues column ``order[j]`` of the rotated start (a warm start rotates each column only a little), so
    that the caller can permute per-column statistics alike. Raises :class:`LinAlgFailure` if a QR raises
    (non-finite results are the caller's to check).
    """
    if B is None:
        B = Q.mT @ A @ Q
    first = torch.diagonal(B, dim1=-2, dim2=-1).argsort(dim=-1, descending=True, stable=True)
    Q = permute_columns(Q, first)
    B = permute_columns(B, first).gather(-2, first.unsqueeze(-1).expand_as(B))
    iterations = torch.zeros(A.shape[:-2], dtype=torch.int64, device=A.device)
    for _ in range(max_iterations):
        active = off_diagonal_ratio(B) > tolerance
        if not bool(active.any()):
            break
        Qi, Ri = _qr(B)
        keep = active[..., None, None]
        B = torch.where(keep, Ri @ Qi, B)
        Q = torch.where(keep, Q @ Qi, Q)
        iterations += active
    estimates, last = torch.diagonal(B, dim1=-2, dim2=-1).sort(stable=True)
    return estimates, permute_columns(Q, last), iterations, first.gather(-1, last)


def _qr(X: Tensor) -> tuple[Tensor, Tensor]:
    try:
        return torch.linalg.qr(X)
    except RuntimeError as err:
        raise LinAlgFailure(f"QR failed: {err}") from err


def cholesky_qr(X: Tensor) -> tuple[Tensor, Tensor]:
    r"""The ``Q`` of ``X = QR`` for each ``[..., n, n]`` matrix by shifted CholeskyQR3: matmuls, batched
    Cholesky factorisations and triangular solves instead of Householder reflections. Returns ``(Q, ok)``,
    ``ok`` per matrix.

    The columns are first scaled to unit norm (``X D = Q (R D)``: the same ``Q``), so that a power step's
    ``A·Q``, whose columns are ≈ ``λ_k q_k``, does not carry ``A``'s spread of eigenvalues into the Gram
    matrix. A pass is ``G = XᵀX = LLᵀ``, ``X ← X L^{-T}``. The first factors ``G + sI`` with
    ``s = 10·n·u·tr(G)`` (Fukaya et al. 2020's shift, in size), which keeps it positive definite where ``X`` is
    ill-conditioned; the next two (CholeskyQR2, Yamamoto et al. 2015) restore orthogonality. ``R``'s diagonal
    is positive, so a column may have the opposite sign of LAPACK's Householder ``Q``; SOAP's update does not
    depend on the basis' signs. ``ok`` is False where a factorisation failed or the result is not orthonormal
    to ``64·√n·u`` (``X`` of numerical rank below ``n``); the caller falls back to Householder QR there, and
    ``Q`` holds ``X`` itself for those matrices. A matrix whose second factorisation fails does not take the
    third pass: on the factors of a 20M LM's first two refreshes (128 matrices, 92 failing; a 2-core CPU;
    ``benchmarks/cholesky_qr_probe.py --steps 21``) ``cholesky_qr`` took 8.8 s instead of 16.3, and with
    Householder QR for the failed 14.1 s instead of 21.6.
    Under TF32 matmuls the Gram matrices carry TF32's rounding, and the test is ``‖QᵀQ - I‖_F ≤ 2·√n·2⁻¹⁰``
    (:func:`~precond.precision.matmul_epsilon`): on a 20M LM's factors, with TF32 emulated on a CPU, a clean
    result measured 0.41·√n·2⁻¹⁰ (inputs rounded to nearest; 0.76 truncated), those that fail float32's test
    1.6·√n·2⁻¹⁰ and far more; judged by float32's test, every TF32 result had failed.
    """
    n = X.shape[-1]
    u = torch.finfo(X.dtype).eps
    spacing = matmul_epsilon(X)  # u, or TF32's under TF32 matmuls
    tolerance = math.sqrt(n) * (64.0 * u if spacing == u else 2.0 * spacing)
    eye = torch.eye(n, dtype=X.dtype, device=X.device)
    stack = X.reshape(-1, n, n)
    Q = stack / torch.linalg.vector_norm(stack, dim=-2, keepdim=True).clamp(min=torch.finfo(X.dtype).tiny)
    ok = torch.ones(stack.shape[0], dtype=torch.bool, device=X.device)
    live = torch.arange(stack.shape[0], device=X.device)  # the matrices still worked on
    for shifted, second in ((True, False), (False, True), (False, False)):
        G = matmul(Q.mT, Q)
        if shifted:
            G = G + (10.0 * n * u) * torch.diagonal(G, dim1=-2, dim2=-1).sum(-1)[..., None, None] * eye
        try:
            L, info = torch.linalg.cholesky_ex(G)
        except RuntimeError:  # the solver itself failed: every matrix takes the fallback
            return X, torch.zeros(X.shape[:-2], dtype=torch.bool, device=X.device)
        failed = info != 0
        # The second factorisation is where an ill-conditioned X fails (every failure among a trained LM's
        # factors showed there: benchmarks/cholesky_qr_probe.py's matrices), and a failure is final, so the
        # failed matrices leave the stack there rather than pay for the passes left.
        if second and bool(failed.any()):  # a host read, as the caller's fallback decision is
            ok[live[failed]] = False
            kept = ~failed
            live, L, Q, failed = live[kept], L[kept], Q[kept], failed[kept]
            if live.numel() == 0:
                return X, ok.reshape(X.shape[:-2])
        ok[live] &= ~failed
        Q = torch.linalg.solve_triangular(L, Q.mT, upper=False).mT  # X L^{-T} = (L^{-1} Xᵀ)ᵀ
    ok[live] &= torch.linalg.matrix_norm(matmul(Q.mT, Q) - eye) <= tolerance  # a NaN fails too
    if live.numel() < stack.shape[0]:  # the failed matrices hand X back
        Q = stack.index_copy(0, live, Q)
    return Q.reshape(X.shape), ok.reshape(X.shape[:-2])


def power_qr_step(A: Tensor, Q: Tensor, sort: bool = True,
                  retry_first: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    r"""SOAP's refresh: one power-iteration step followed by a QR orthonormalisation (``[..., n, n]``).

    The columns of ``Q`` are first sorted by their Rayleigh quotients ``diag(QᵀAQ)``, descending (unless
    ``sort=False``: KL-SOAP keeps the order, and ``order`` is then the identity); then ``Q ← qr(A Q)``, by
    :func:`cholesky_qr`, with Householder QR (LAPACK) for the matrices where that fails (on a data-centre GPU
    a float32 stack first tries CholeskyQR again in float64: :func:`_orthonormalise_again`). The matrices
    flagged in ``retry_first`` (a bool per matrix) skip the first CholeskyQR and go straight to that retry:
    the caller's guess, from their history, that it would fail again.
    Returns ``(new Q, order, fell_back, cholesky_failed)`` (``fell_back``: took Householder QR;
    ``cholesky_failed``: CholeskyQR in the input's precision was tried and failed) so that the caller can
    permute per-column statistics (SOAP's second moment) the same way and count both; raises
    :class:`LinAlgFailure` if the Householder QR raises. Deciding on a fallback reads a flag on the host, as
    does a ``retry_first`` given.
    """
    AQ = matmul(A, Q)
    if sort:
        estimates = (Q * AQ).sum(-2)  # diag(QᵀAQ) without a second product
        order = torch.argsort(estimates, dim=-1, descending=True)
        X = permute_columns(AQ, order)  # A·(Q's columns in order) = (AQ)'s columns in order
    else:
        order, X = torch.arange(A.shape[-1], device=A.device).expand(A.shape[:-1]), AQ
    skipped = torch.zeros(X.shape[:-2], dtype=torch.bool, device=X.device) if retry_first is None else retry_first
    if retry_first is not None and bool(retry_first.any()):
        Q_new, ok = X, torch.zeros_like(skipped)
        tried = (~skipped).nonzero(as_tuple=True)
        if tried[0].numel():
            Q_tried, ok_tried = cholesky_qr(X[tried])
            Q_new, ok = Q_new.index_put(tried, Q_tried), ok.index_put(tried, ok_tried)
    else:
        Q_new, ok = cholesky_qr(X)
    fell_back = ~ok
    if bool(fell_back.any()):
        # the failed matrices alone: where a few of a large stack fail (rank-deficient factors early in
        # training), a fallback for the whole stack would cost more than the CholeskyQR it replaces
        failed = fell_back.nonzero(as_tuple=True)
        retried, by_householder = _orthonormalise_again(X[failed])
        fell_back[failed] = by_householder
        Q_new = Q_new.index_put(failed, retried)
    return Q_new, order, fell_back, ~ok & ~skipped


def _orthonormalise_again(X: Tensor) -> tuple[Tensor, Tensor]:
    """``(Q, by_householder)`` for matrices whose CholeskyQR failed: CholeskyQR in float64 first where that
    keeps float32's pace (:func:`_float64_keeps_pace`), Householder QR for what is left. A trained factor's
    ``A·Q`` often sits past float32's reach (condition up to 5e9 with unit columns against ~8e6) and within
    float64's (~4e15): on a 20M LM's factors float64 passed 252 of 256 matrices, float32 108
    (``benchmarks/cholesky_qr_probe.py``)."""
    by_householder = torch.ones(X.shape[:-2], dtype=torch.bool, device=X.device)
    if not _float64_keeps_pace(X):
        return _qr(X)[0], by_householder
    Q, ok = cholesky_qr(X.double())
    Q = Q.to(X.dtype)
    by_householder = ~ok
    if bool(by_householder.any()):
        left = by_householder.nonzero(as_tuple=True)
        Q = Q.index_put(left, _qr(X[left])[0])
    return Q, by_householder


def _float64_keeps_pace(X: Tensor) -> bool:
    """Whether float64 products cost about what float32's do for this float32 stack: on the data-centre GPUs
    whose float64 tensor cores run at float32's (non-TF32) rate (compute capability 8.0 and 9.0: A100,
    H100/H200); not on a CPU (half the rate, and LAPACK's QR is quick there) nor on other GPUs (down to 1/64)."""
    return X.is_cuda and X.dtype == torch.float32 and torch.cuda.get_device_capability(X.device) in ((8, 0), (9, 0))


def _spectral_norm_estimate(W: Tensor, iterations: int = 8, normalize_every: int = 1) -> Tensor:
    """Power-iteration estimate of ``‖W‖₂`` (shape ``[..., 1, 1]``) for each matrix of ``[..., m, n]``
    (matrix-vector products only, from a fixed start so that no random stream is consumed). A lower bound;
    callers add a margin.

    ``v`` is rescaled to unit length every ``normalize_every`` products of ``WᵀW`` (and after the last):
    three operators fewer each time it is not. Only for a ``W`` of known size: between rescalings ``v``
    grows by ``‖W‖₂^(2·normalize_every)`` at most."""
    n = W.shape[-1]
    tiny = torch.finfo(W.dtype).tiny
    v = 1.0 + 0.5 * torch.sin(torch.arange(n, dtype=W.dtype, device=W.device))
    v = v.expand(W.shape[:-2] + (n,)).unsqueeze(-1)
    for i in range(1, iterations + 1):
        v = W.mT @ (W @ v)
        if i % normalize_every == 0 or i == iterations:
            v = v / torch.linalg.vector_norm(v, dim=-2, keepdim=True).clamp(min=tiny)
    return torch.linalg.vector_norm(W @ v, dim=-2, keepdim=True)


def refine_eigenbasis(A: Tensor, X: Tensor, iterations: int = 1, tolerance: float = 0.0,
                      damping: float = 0.05, max_angle: float = 0.05, max_rotation: float = 0.5,
                      projected: Tensor | None = None) -> tuple[Tensor, Tensor]:
    r"""Matmul-only refinement of approximate eigenbases ``X`` of symmetric matrices ``A`` (``[..., n, n]``).

    One iteration is a first-order eigenvector correction in the style of Ogita & Aishima's iterative
    refinement (2018), made safe for clustered spectra:

    .. math::
        S = X^T A X,\quad R = I - X^T X,\quad \tilde\lambda_i = S_{ii} / (1 - R_{ii}),\\
        C_{ij} = S_{ij} + \tfrac12(\tilde\lambda_i + \tilde\lambda_j) R_{ij},\quad
        g_{ij} = \tilde\lambda_j - \tilde\lambda_i,\quad
        W_{ij} = \operatorname{clip}\big(C_{ij}\, g_{ij} / (g_{ij}^2 + \mu^2), \pm\rho\big),\quad
        \mu = \kappa\,\|C - \operatorname{diag} C\|_F,\\
        W \leftarrow W \cdot \min(1, w_{\max} / \|W\|_2),\quad
        X \leftarrow X\,(I + \tfrac12 R + W + \tfrac12 W^2).

    ``W`` is antisymmetric (``C`` is symmetric, ``g`` antisymmetric); for a pair ``(i, j)`` whose gap is large
    against ``μ``, ``W_ij`` is the rotation that diagonalises it to first order. Pairs closer than ``μ`` (the
    bulk of a dense spectrum, whose rotation barely changes the quadratic form) are damped towards no
    rotation, and every angle is clipped at ``ρ = max_angle``, so they cannot swamp the step;
    ``μ = κ·‖off-diagonal‖_F`` (``κ = damping``) vanishes as the basis converges, which restores the
    quadratic convergence of the undamped correction. Bounding ``‖W‖₂`` (a power-iteration estimate) keeps
    ``I + W + W²/2`` within ``‖W‖⁴/4`` of orthogonal. ``R/2`` restores orthogonality lost earlier to first
    order; the first iteration takes ``X`` as orthonormal (``R = 0``: the caller's basis comes from ``eigh``,
    a QR or an earlier refinement), which saves a product. A matrix stops once ``off_diagonal_ratio(S) ≤
    tolerance``; no host sync. A final Newton–Schulz step ``X ← X(3I - XᵀX)/2`` squares what is left of the
    orthogonality error (and of the rounding that makes ``W`` not exactly antisymmetric). Columns keep their
    order, so per-column statistics stay aligned. Batched products of size ``n``: 6 for one iteration, 5 for
    each further one, two fewer when ``projected`` (``XᵀAX``, already computed by the caller's criterion) is
    passed. Returns ``(X, iterations taken per matrix)``; non-finite results are the caller's to check.
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    tiny = torch.finfo(A.dtype).tiny
    taken = torch.zeros(A.shape[:-2], dtype=torch.int64, device=A.device)
    for i in range(iterations):
        S = projected if i == 0 and projected is not None else matmul(X.mT, matmul(A, X))
        lam = torch.diagonal(S, dim1=-2, dim2=-1)
        R = None if i == 0 else eye - matmul(X.mT, X)
        if R is None:
            coupling = S
        else:
            lam = lam / (1.0 - torch.diagonal(R, dim1=-2, dim2=-1))
            coupling = S + 0.5 * (lam.unsqueeze(-2) + lam.unsqueeze(-1)) * R
        gap = lam.unsqueeze(-2) - lam.unsqueeze(-1)  # gap[i, j] = λ_j - λ_i
        off, total = _off_diagonal_norms(coupling)  # ‖C - diag C‖_F, ‖C‖_F
        mu2 = (damping * off).square()[..., None, None]
        # C_ii·0 / μ² = 0 on the diagonal; in place on the temporaries: each pass here reads n² per matrix
        W = (coupling * gap).div_(torch.addcmul(mu2, gap, gap).clamp_(min=tiny))
        W.clamp_(-max_angle, max_angle)
        # W's entries are clipped to max_angle, so ‖W‖₂ ≤ max_angle·n: four products between rescalings grow
        # v by (max_angle·n)⁸ at most (< 10³⁰ for n ≤ 10⁵ at 0.05). A W so small that v underflows estimates
        # 0, and then its bound is not active anyway. Two rescalings instead of eight: 18 fewer launches.
        W.mul_((max_rotation / (1.25 * _spectral_norm_estimate(W, normalize_every=4)).clamp(min=tiny))
               .clamp(max=1.0))
        ratio = off / total.clamp(min=tiny) if R is None else off_diagonal_ratio(S)  # C = S when R = 0
        active = ~(ratio <= tolerance)  # a non-finite S stays active and surfaces as NaN
        step = torch.add(W, matmul(W, W), alpha=0.5)
        if R is not None:
            step.add_(R, alpha=0.5)
        X = torch.where(active[..., None, None], X + matmul(X, step), X)
        taken += active
    return matmul(X, matmul(X.mT, X)).mul_(-0.5).add_(X, alpha=1.5), taken


def inverse_sqrt_newton_schulz(A: Tensor, epsilon: float, iterations: int = 25) -> Tensor:
    r"""``(A + εI)^{-1/2}`` by the coupled Newton–Schulz iteration (matmuls only), for ``[..., n, n]``.

    Scale ``Y = (A + εI)/s`` with ``s = ‖A + εI‖_F``, ``Z = I``; repeat
    ``T = (3I - ZY)/2; Y ← YT; Z ← TZ``. ``Z → (Y₀)^{-1/2}``, so the result is ``Z / √s``.
    Non-finite results are the caller's to check.
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    M = A + epsilon * eye
    s = torch.linalg.matrix_norm(M, keepdim=True)
    Y = M / s
    Z = eye.expand_as(M).clone()
    for _ in range(iterations):
        T = 0.5 * (3.0 * eye - Z @ Y)
        Y = Y @ T
        Z = T @ Z
    return Z / torch.sqrt(s)


def inverse_root_newton(A: Tensor, root: int, epsilon: float, max_iterations: int = 100,
                        tolerance: float = 1e-6) -> Tensor:
    r"""``(A + εI)^{-1/root}`` by the coupled Newton iteration (Guo & Higham 2006), for ``[..., n, n]``.

    With ``c = (2‖A‖_F / (root+1))^{1/root}``: ``X = I/c``, ``M = A/c^root``; repeat
    ``T = ((root+1)I - M)/root; X ← XT; M ← T^root M`` until ``max|M - I| < tolerance`` for every matrix
    (a host read per iteration). Raises :class:`LinAlgFailure` if that has not happened after
    ``max_iterations``.
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    M = A + epsilon * eye
    c = (2.0 * torch.linalg.matrix_norm(M, keepdim=True) / (root + 1)) ** (1.0 / root)
    X = eye / c
    M = M / c**root
    for _ in range(max_iterations):
        T = ((root + 1) * eye - M) / root
        X = X @ T
        M = torch.linalg.matrix_power(T, root) @ M
        if bool(((M - eye).abs().amax((-2, -1)) < tolerance).all()):
            if not bool(torch.isfinite(X).all()):
                break
            return X
    raise LinAlgFailure(f"coupled Newton did not converge in {max_iterations} iterations")


def spectral_normalize(directions: Tensor, iterations: int = 32, transposed: bool = False) -> Tensor:
    r"""Each block ``P`` of a stack ``[B, d_out, *rest]`` rescaled to spectral norm :math:`\sqrt{d_{out}/d_{in}}`
    (``d_in = prod(rest)``; the block is read as the matrix ``[d_out, d_in]``), the size the spectral condition
    for feature learning asks of a hidden layer's update. A zero block stays zero. ``transposed``: the blocks
    are 2-D and stored ``[d_in, d_out]`` (Hugging Face's ``Conv1D``), so the target is ``sqrt(shape[2]/shape[1])``.

    ``‖P‖₂`` is estimated with matrix-vector products only (an SVD is ~100× slower on a GPU):
    ``iterations`` power steps ``v ← Pᵀ(Pv)`` over the shorter side, in float32 at least, from a fixed start
    (:func:`_spectral_norm_estimate`). The estimate never exceeds the true norm, so a normalised block's
    norm is at or a little above the target: on Gaussian matrices (close top singular values, a hard case)
    up to 3.1% above it, measured for 64×64 to 1024×1024; on the optimizers' directions within 1% (tested against the SVD).
    """
    b, d_out = directions.shape[:2]
    compute = torch.promote_types(directions.dtype, torch.float32)
    mats = directions.reshape(b, d_out, -1).to(compute)
    d_in = mats.shape[-1]
    norms = _spectral_norm_estimate(mats if d_in <= d_out else mats.mT, iterations).reshape(b)
    ratio = d_in / d_out if transposed else d_out / d_in
    scale = torch.where(norms > 0, ratio ** 0.5 / norms, 0.0).to(directions.dtype)
    return directions * scale.view((b,) + (1,) * (directions.dim() - 1))

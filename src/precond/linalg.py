"""Pure linear-algebra functions shared by every preconditioner.

Nothing here keeps state. Functions that can fail numerically raise :class:`LinAlgFailure`; the caller
keeps its last good result and counts the failure (see ``preconditioners/kronecker.py``).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = [
    "LinAlgFailure",
    "symmetric_eigh",
    "inverse_root",
    "off_diagonal_ratio",
    "qr_algorithm",
    "power_qr_step",
    "newton_schulz",
    "inverse_sqrt_newton_schulz",
    "inverse_root_newton",
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


def inverse_root(A: Tensor, exponent: float, epsilon: float) -> Tensor:
    r"""``(A + εI)^{-exponent}`` of a symmetric PSD matrix through its eigen-decomposition.

    With ``A + εI = Q diag(λ) Qᵀ``: if rounding left ``λ_min < ε`` the spectrum is shifted to
    ``λ - λ_min + ε`` (so every eigenvalue is at least ε), then ``Q diag(λ^{-exponent}) Qᵀ``.
    This is the perturbation rule of Distributed Shampoo's default root-inverse configuration.
    """
    n = A.shape[-1]
    L, Q = symmetric_eigh(A + epsilon * torch.eye(n, dtype=A.dtype, device=A.device))
    lam_min = L.min()
    if lam_min < epsilon:
        L = L - lam_min + epsilon
    root = (Q * L.pow(-exponent).unsqueeze(0)) @ Q.T
    if not torch.isfinite(root).all():
        raise LinAlgFailure("inverse root has non-finite entries")
    return root


def off_diagonal_ratio(B: Tensor) -> Tensor:
    r"""``‖B - diag(B)‖_F / ‖B‖_F``: how far ``B = QᵀAQ`` is from diagonal.

    ``‖A - Q diag(B) Qᵀ‖_F = ‖B - diag(B)‖_F`` and ``‖B‖_F = ‖A‖_F``, so this is the relative error of
    approximating ``A`` in the basis ``Q`` ("Purifying Shampoo", Eschenhagen et al. 2025).
    """
    total = torch.linalg.matrix_norm(B)
    diag = torch.linalg.vector_norm(torch.diagonal(B))
    off = torch.sqrt(torch.clamp(total.square() - diag.square(), min=0.0))
    return off / torch.clamp(total, min=torch.finfo(B.dtype).tiny)


def qr_algorithm(A: Tensor, Q: Tensor, max_iterations: int, tolerance: float) -> tuple[Tensor, Tensor, int]:
    r"""Warm-started QR algorithm for the eigenbasis of a symmetric ``A``.

    ``B = QᵀAQ``; while fewer than ``max_iterations`` steps were taken and
    ``off_diagonal_ratio(B) > tolerance``: ``Q', R' = qr(B); B = R'Q'; Q = Q Q'``. The estimates
    ``diag(B)`` are then sorted ascending (stable) and ``Q``'s columns permuted alike.
    Returns ``(eigenvalue estimates, Q, iterations taken)``.
    """
    B = Q.T @ A @ Q
    iterations = 0
    while iterations < max_iterations and off_diagonal_ratio(B) > tolerance:
        Qi, Ri = _qr(B)
        B = Ri @ Qi
        Q = Q @ Qi
        iterations += 1
    estimates, order = torch.diagonal(B).sort(stable=True)
    Q = Q[:, order]
    if not torch.isfinite(Q).all():
        raise LinAlgFailure("QR iteration produced non-finite values")
    return estimates, Q, iterations


def _qr(X: Tensor) -> tuple[Tensor, Tensor]:
    try:
        return torch.linalg.qr(X)
    except RuntimeError as err:
        raise LinAlgFailure(f"QR failed: {err}") from err


def power_qr_step(A: Tensor, Q: Tensor) -> tuple[Tensor, Tensor]:
    r"""SOAP's refresh: one power-iteration step followed by a QR orthonormalisation.

    The columns of ``Q`` are first sorted by their Rayleigh quotients ``diag(QᵀAQ)``, descending; then
    ``Q ← qr(A Q)``. Returns ``(new Q, order)`` so that the caller can permute per-column statistics
    (SOAP's second moment) the same way.
    """
    estimates = torch.diagonal(Q.T @ A @ Q)
    order = torch.argsort(estimates, descending=True)
    Q_new, _ = _qr(A @ Q[:, order])
    if not torch.isfinite(Q_new).all():
        raise LinAlgFailure("power-QR step produced non-finite values")
    return Q_new, order


def newton_schulz(
    G: Tensor,
    steps: int,
    coefficients: tuple[float, float, float],
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
) -> Tensor:
    r"""Approximate ``U Vᵀ`` of ``G = U S Vᵀ`` with the quintic Newton–Schulz iteration (Muon).

    ``X = G / max(‖G‖_F, eps)`` (transposed when it has more rows than columns), then ``steps`` times
    ``A = X Xᵀ; X ← aX + (bA + cA²) X``. Works on the last two dims, so a stack of matrices is one call.
    """
    a, b, c = coefficients
    X = G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    X = X / torch.linalg.matrix_norm(X, keepdim=True).clamp(min=eps)
    # addmm/baddbmm fuse the scalings as torch.optim.Muon does, so the bf16 rounding matches it.
    fused = torch.addmm if X.dim() == 2 else torch.baddbmm
    for _ in range(steps):
        A = X @ X.mT
        B = fused(A, A, A, beta=b, alpha=c)
        X = fused(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X.to(G.dtype)


def inverse_sqrt_newton_schulz(A: Tensor, epsilon: float, iterations: int = 25) -> Tensor:
    r"""``(A + εI)^{-1/2}`` by the coupled Newton–Schulz iteration (matmuls only).

    Scale ``Y = (A + εI)/s`` with ``s = ‖A + εI‖_F``, ``Z = I``; repeat
    ``T = (3I - ZY)/2; Y ← YT; Z ← TZ``. ``Z → (Y₀)^{-1/2}``, so the result is ``Z / √s``.
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    M = A + epsilon * eye
    s = torch.linalg.matrix_norm(M)
    Y = M / s
    Z = eye.clone()
    for _ in range(iterations):
        T = 0.5 * (3.0 * eye - Z @ Y)
        Y = Y @ T
        Z = T @ Z
    out = Z / torch.sqrt(s)
    if not torch.isfinite(out).all():
        raise LinAlgFailure("Newton-Schulz inverse square root produced non-finite values")
    return out


def inverse_root_newton(A: Tensor, root: int, epsilon: float, max_iterations: int = 100,
                        tolerance: float = 1e-6) -> Tensor:
    r"""``(A + εI)^{-1/root}`` by the coupled Newton iteration (Guo & Higham 2006), matmuls only.

    With ``c = (2‖A‖_F / (root+1))^{1/root}``: ``X = I/c``, ``M = A/c^root``; repeat
    ``T = ((root+1)I - M)/root; X ← XT; M ← T^root M`` until ``max|M - I| < tolerance``.
    Raises :class:`LinAlgFailure` if it has not converged after ``max_iterations``.
    """
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    M = A + epsilon * eye
    c = (2.0 * torch.linalg.matrix_norm(M) / (root + 1)) ** (1.0 / root)
    X = eye / c
    M = M / c**root
    for _ in range(max_iterations):
        T = ((root + 1) * eye - M) / root
        X = X @ T
        M = torch.linalg.matrix_power(T, root) @ M
        if (M - eye).abs().max() < tolerance:
            if not torch.isfinite(X).all():
                break
            return X
    raise LinAlgFailure(f"coupled Newton did not converge in {max_iterations} iterations")

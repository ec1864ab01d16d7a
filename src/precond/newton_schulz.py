"""Muon's orthogonalisation: the polar factor ``U Vᵀ`` of ``G = U S Vᵀ`` by the quintic Newton–Schulz
iteration, directly or through the small Gram matrix, with the FLOP counts that choose between them.

Every function takes a matrix or a stack of same-shaped matrices (``[k, m, n]``), so a bucket is one call.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "Coefficients",
    "per_step_coefficients",
    "newton_schulz",
    "gram_newton_schulz",
    "newton_schulz_flops",
    "gram_newton_schulz_flops",
]


Coefficients = tuple[float, float, float] | Sequence[tuple[float, float, float]]


def per_step_coefficients(coefficients: Coefficients, steps: int) -> list[tuple[float, float, float]]:
    """One ``(a, b, c)`` per step: a single triple for every step (torch.optim.Muon's form), or a list of
    ``steps`` triples, one per step (Polar Express's form, You's)."""
    if len(coefficients) == 3 and all(isinstance(v, (int, float)) for v in coefficients):
        return [tuple(coefficients)] * steps
    if len(coefficients) != steps or not all(len(abc) == 3 for abc in coefficients):
        raise ValueError(f"Newton–Schulz coefficients: expected (a, b, c) or {steps} such triples, one per step; "
                         f"got {coefficients!r}")
    return [tuple(abc) for abc in coefficients]


def newton_schulz(
    G: Tensor,
    steps: int,
    coefficients: Coefficients,
    eps: float,
    dtype: torch.dtype = torch.bfloat16,
    keep_dtype: bool = False,
) -> Tensor:
    r"""Approximate ``U Vᵀ`` of ``G = U S Vᵀ`` with the quintic Newton–Schulz iteration (Muon).

    ``X = G / max(‖G‖_F, eps)`` (transposed when it has more rows than columns), then ``steps`` times
    ``A = X Xᵀ; X ← aX + (bA + cA²) X``, with one ``(a, b, c)`` or one per step (:func:`per_step_coefficients`).
    Works on a matrix or a stack of them (``[k, m, n]``), so a bucket of same-shaped matrices is one call.
    """
    half = dtype == torch.float16  # normalised before the cast: float16's range ends at 65504
    X = _normalised(G, eps).to(dtype) if half else G.to(dtype)
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    if not half:  # normalised after the cast, as torch.optim.Muon does (its bf16 rounding)
        X = X / torch.linalg.matrix_norm(X, keepdim=True).clamp(min=eps)
    # addmm/baddbmm fuse the scalings as torch.optim.Muon does, so the bf16 rounding matches it.
    fused = torch.addmm if X.dim() == 2 else torch.baddbmm
    for a, b, c in per_step_coefficients(coefficients, steps):
        A = X @ X.mT
        B = fused(A, A, A, beta=b, alpha=c)
        X = fused(X, B, X, beta=a)
    if transposed:
        X = X.mT
    return X if keep_dtype else X.to(G.dtype)


def _normalised(G: Tensor, eps: float) -> Tensor:
    """``G / max(‖G‖_F, eps)`` per matrix, in float32 at least (float16's range ends at 65504, which the
    Frobenius norm of a large matrix passes)."""
    if G.element_size() < 4:
        G = G.float()
    return G / torch.linalg.matrix_norm(G, keepdim=True).clamp(min=eps)


def gram_newton_schulz(
    G: Tensor,
    steps: int,
    coefficients: Coefficients,
    eps: float,
    dtype: torch.dtype = torch.float16,
    keep_dtype: bool = False,
    restart_iterations: tuple[int, ...] = (2,),
) -> Tensor:
    r""":func:`newton_schulz`'s result, iterated on the small Gram matrix (Zhang, Amsel, Chen, Dao 2026).

    On the wide orientation (``m ≤ n``) every quintic step multiplies ``X`` on the left by a polynomial of
    ``R = X Xᵀ``: ``X ← P X`` with ``P = aI + bR + cR²``. So the ``m × m`` products can carry the whole
    iteration, ``Q ← Q P`` and ``R ← P R P``, and ``X`` is touched by ``m × m × n`` products only at the
    start (``R₀ = X Xᵀ``) and the end (``X ← Q X``): ``8m²n + 28m³`` FLOPs for five steps with one restart
    against ``20m²n + 10m³``. Equal to :func:`newton_schulz` in exact arithmetic; in half precision the
    recurrence for ``R`` drifts (spurious negative eigenvalues), so after each iteration listed in
    ``restart_iterations`` (1-based; the authors restart once, after the 2nd of 5) the iteration starts
    again from ``X ← Q X``, ``R ← X Xᵀ``, ``Q ← I``. The authors compute in float16 (its 10-bit mantissa against
    bfloat16's 7; ``X`` is normalised, so its range suffices).
    """
    X = _normalised(G, eps).to(dtype)  # before the cast, as its authors do
    transposed = X.size(-2) > X.size(-1)
    if transposed:
        X = X.mT
    fused = torch.addmm if X.dim() == 2 else torch.baddbmm
    R, Q = X @ X.mT, None  # Q = None: the identity, never formed
    for t, (a, b, c) in enumerate(per_step_coefficients(coefficients, steps)):
        if t in restart_iterations and Q is not None:
            X = Q @ X
            R, Q = X @ X.mT, None
        # P = aI + Z with Z = bR + cR²; the aI terms ride in the products' beta, as the authors write it
        # (so the half-precision rounding is theirs)
        Z = fused(R, R, R, beta=b, alpha=c)
        if Q is None:
            Q = Z.clone()
            Q.diagonal(dim1=-2, dim2=-1).add_(a)
        else:
            Q = fused(Q, Q, Z, beta=a)  # Q P
        if t + 1 < steps and t + 1 not in restart_iterations:  # R is read again
            RP = fused(R, R, Z, beta=a)
            R = fused(RP, Z, RP, beta=a)  # P R P
    if Q is not None:
        X = Q @ X
    if transposed:
        X = X.mT
    return X if keep_dtype else X.to(G.dtype)


def newton_schulz_flops(rows: int, cols: int, steps: int) -> int:
    """Multiply-add FLOPs (×2) of :func:`newton_schulz`'s products for one ``rows × cols`` matrix."""
    m, n = min(rows, cols), max(rows, cols)
    return steps * (4 * m * m * n + 2 * m ** 3)


def gram_newton_schulz_flops(rows: int, cols: int, steps: int, restart_iterations: tuple[int, ...] = (2,)) -> int:
    """The same count for :func:`gram_newton_schulz`: its ``m × m × n`` products and ``m × m × m`` ones."""
    m, n = min(rows, cols), max(rows, cols)
    wide, small, fresh = 2, 0, True  # R₀ = X Xᵀ and the final Q X; Q starts as the identity
    for t in range(steps):
        if t in restart_iterations and not fresh:
            wide, fresh = wide + 2, True
        small += 1 + (0 if fresh else 1)  # R², then Q P
        fresh = False
        if t + 1 < steps and t + 1 not in restart_iterations:
            small += 2  # P (R P)
    return 2 * m * m * n * wide + 2 * m ** 3 * small

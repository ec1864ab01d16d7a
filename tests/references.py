"""Plain float64 references of each update rule, written from the formulas, not from precond's code.

Each reference optimises one tensor, given as a list of gradients, and returns the parameter after each
step. Blocks are handled explicitly by the callers (``split_blocks``) so that every rule here reads as
the math in ALGORITHMS.md.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch


def unfold(G: torch.Tensor, i: int) -> torch.Tensor:
    """Mode-i unfolding: an ``n_i × (prod of the other dims)`` matrix."""
    return G.movedim(i, 0).reshape(G.shape[i], -1)


def mode_multiply(X: torch.Tensor, M: torch.Tensor, i: int) -> torch.Tensor:
    """``(X ×_i M)[..., a, ...] = Σ_b M[a, b] X[..., b, ...]``."""
    return torch.tensordot(M, X, dims=([1], [i])).movedim(0, i)


def split_blocks(shape: tuple[int, ...], size: int) -> list[tuple[slice, ...]]:
    ranges = [[slice(s, min(s + size, n)) for s in range(0, n, size)] for n in shape]
    return list(itertools.product(*ranges))


def numpy_power(A: torch.Tensor, p: float) -> torch.Tensor:
    """``A^p`` for symmetric positive definite ``A``, by numpy's eigh."""
    w, V = np.linalg.eigh(A.numpy())
    return torch.from_numpy((V * w**p) @ V.T)


def diagonal_direction(kind: str, v: torch.Tensor, x: torch.Tensor, t: int, beta2: float, eps: float):
    if kind == "sgd":
        return x
    if kind == "adam":
        v = v / (1 - beta2**t)
    return x / (v.sqrt() + eps)


def shampoo(W0, grads, *, lr, betas, eps, wd, freq=1, start=None, grafting=None, graft_beta2=0.999,
            graft_eps=1e-10, bias_correction=True, decoupled=True, exponent=None, kl=False, refine=None):
    """Shampoo on one block (no blocking here), Distributed Shampoo's order of operations. ``kl``:
    KL-Shampoo, each factor's statistic from G multiplied along every other dim by that dim's current root.
    ``refine(M, Q)``: roots from a warm-started eigenbasis, numpy's at the first refresh, then ``refine``'s
    update of the last one, the eigenvalues read off ``diag(QᵀMQ)`` and lifted to at least ε."""
    beta1, beta2 = betas
    start = freq if start is None else start
    W = W0.clone()
    k = W.dim()
    p = exponent if exponent is not None else 1.0 / (2 * k)
    L = [torch.zeros(n, n, dtype=W.dtype) for n in W.shape]
    R = [torch.eye(n, dtype=W.dtype) for n in W.shape]
    M = torch.zeros_like(W)
    V = torch.zeros_like(W)
    out = []
    for t, G in enumerate(grads, start=1):
        if not decoupled:
            G = G + wd * W
        for i in range(k):
            Gt = G
            for j in range(k):
                if kl and j != i:
                    Gt = mode_multiply(Gt, R[j], j)
            Gi = unfold(Gt, i)
            L[i] = (L[i] + Gi @ Gi.T) if beta2 == 1 else (beta2 * L[i] + (1 - beta2) * Gi @ Gi.T)
        if grafting == "adagrad":
            V = V + G * G
        elif grafting in ("adam", "rmsprop"):
            V = graft_beta2 * V + (1 - graft_beta2) * G * G
        bc2 = 1 - beta2**t if (bias_correction and beta2 < 1) else 1.0
        if (t % freq == 0 and t > start) or t == start:
            Ms = [L[i] / bc2 + eps * torch.eye(L[i].shape[0], dtype=W.dtype) for i in range(k)]
            if refine is None:
                R = [numpy_power(M_i, -p) for M_i in Ms]
            else:
                if t == start:
                    Q = [torch.from_numpy(np.linalg.eigh(M_i.numpy())[1]) for M_i in Ms]
                else:
                    Q = [refine(M_i, Q_i) for M_i, Q_i in zip(Ms, Q)]
                lams = [torch.diagonal(Q_i.T @ M_i @ Q_i) for M_i, Q_i in zip(Ms, Q)]
                lams = [lam - lam.min() + eps if lam.min() < eps else lam for lam in lams]
                R = [(Q_i * lam**-p) @ Q_i.T for Q_i, lam in zip(Q, lams)]
        M = beta1 * M + (1 - beta1) * G
        Mh = M / (1 - beta1**t) if bias_correction else M
        if grafting is not None:
            D = diagonal_direction(grafting, V, Mh, t, graft_beta2, graft_eps)
        if grafting is not None and t < start:
            P = D
        else:
            P = Mh
            for i in range(k):
                P = mode_multiply(P, R[i], i)
            if grafting is not None:
                P = P * D.norm() / (P.norm() + 1e-16)
        if decoupled:
            P = P + wd * W
        W = W - lr * P
        out.append(W.clone())
    return out


def eshampoo(W0, grads, *, lr, betas, eps, wd, freq=1, grafting=None, graft_beta2=0.999, graft_eps=1e-10,
             precondition_1d=False):
    """Eigenvalue-corrected Shampoo on one block, Distributed Shampoo's order of operations. A 1-D tensor
    keeps the identity basis unless ``precondition_1d``."""
    beta1, beta2 = betas
    W = W0.clone()
    k = W.dim()
    L = [torch.zeros(n, n, dtype=W.dtype) for n in W.shape]
    Q = [torch.eye(n, dtype=W.dtype) for n in W.shape]
    D = torch.zeros_like(W)
    M = torch.zeros_like(W)
    V = torch.zeros_like(W)
    out = []
    for t, G in enumerate(grads, start=1):
        for i in range(k):
            Gi = unfold(G, i)
            L[i] = beta2 * L[i] + (1 - beta2) * Gi @ Gi.T
        if grafting == "adam":
            V = graft_beta2 * V + (1 - graft_beta2) * G * G
        bc2 = 1 - beta2**t
        if t % freq == 0 and (k > 1 or precondition_1d):
            Q = [torch.linalg.eigh(L[i] / bc2 + eps * torch.eye(L[i].shape[0], dtype=W.dtype))[1] for i in range(k)]
        Gr = G
        for i in range(k):
            Gr = mode_multiply(Gr, Q[i].T, i)
        D = beta2 * D + (1 - beta2) * Gr * Gr
        M = beta1 * M + (1 - beta1) * G
        Mh = M / (1 - beta1**t)
        X = Mh
        for i in range(k):
            X = mode_multiply(X, Q[i].T, i)
        X = X / ((D / bc2).sqrt() + eps)
        for i in range(k):
            X = mode_multiply(X, Q[i], i)
        if grafting == "adam":
            Dg = diagonal_direction("adam", V, Mh, t, graft_beta2, graft_eps)
            # before the first refresh step (start = freq) the grafted method runs alone
            X = Dg if t < freq else X * Dg.norm() / (X.norm() + 1e-16)
        W = W - lr * (X + wd * W)
        out.append(W.clone())
    return out


def rotate(X, Q, transpose=False):
    """``X ×_i Q_iᵀ`` over the dims with a basis (into the eigenbasis), or ``X ×_i Q_i`` (back)."""
    for i, q in enumerate(Q):
        if q is not None:
            X = mode_multiply(X, q if transpose else q.T, i)
    return X


def adam_in_basis(G, M, V, Q, betas, eps, normalize):
    """SOAP's moments of the rotated gradient and its direction ``[M / (√V + ε)]`` rotated back (RMS 1 if
    ``normalize``): ``(M, V, N)``."""
    Gp = rotate(G, Q)
    M = betas[0] * M + (1 - betas[0]) * Gp
    V = betas[1] * V + (1 - betas[1]) * Gp * Gp
    N = rotate(M / (V.sqrt() + eps), Q, transpose=True)
    if normalize:
        N = N / (1e-30 + N.square().mean().sqrt())
    return M, V, N


def soap(W0, grads, *, lr, betas, eps, wd, freq, shampoo_beta=None, max_dim=10_000, precondition_1d=False,
         normalize=False):
    """SOAP on one tensor in the reference implementation's order (no merging)."""
    beta1, beta2 = betas
    sb = beta2 if shampoo_beta is None else shampoo_beta
    W = W0.clone()
    k = W.dim()
    use = [(n <= max_dim) and (k > 1 or precondition_1d) for n in W.shape]
    L = [torch.zeros(n, n, dtype=W.dtype) if u else None for n, u in zip(W.shape, use)]
    Q = None
    M = torch.zeros_like(W)
    V = torch.zeros_like(W)
    t = 0
    out = []

    def accumulate(G):
        for i in range(k):
            if L[i] is not None:
                Gi = unfold(G, i)
                L[i] = sb * L[i] + (1 - sb) * Gi @ Gi.T

    for G in grads:
        if Q is None:
            accumulate(G)
            Q = [torch.linalg.eigh(L[i])[1].flip(1) if L[i] is not None else None for i in range(k)]
            out.append(W.clone())
            continue
        t += 1
        M, V, N = adam_in_basis(G, M, V, Q, betas, eps, normalize)
        W = W - lr * math.sqrt(1 - beta2**t) / (1 - beta1**t) * N
        W = W - lr * wd * W
        accumulate(G)
        if t % freq == 0:
            Morig = rotate(M, Q, transpose=True)
            for i in range(k):
                if Q[i] is None:
                    continue
                order = torch.argsort(torch.diagonal(Q[i].T @ L[i] @ Q[i]), descending=True)
                V = V.index_select(i, order)
                Q[i] = torch.linalg.qr(L[i] @ Q[i][:, order])[0]
            M = rotate(Morig, Q)
        out.append(W.clone())
    return out


def kl_soap(W0, grads, *, lr, betas, eps, wd, freq, shampoo_beta=None, max_dim=10_000, precondition_1d=False,
            normalize=False, init=0.1, max_clamp=4000):
    """KL-SOAP on one tensor (Lin et al. 2025): SOAP's Adam in the factors' eigenbasis, no bias correction;
    each factor is estimated from the gradient whitened along the other dims by ``Q_j diag(s_j)``, with
    ``s_j = d_j^{-1/2}`` from running estimates ``d_j`` of the factors' eigenvalues along ``Q_j``; every
    statistic of a step reads the values from before it. Bases refresh by ``qr(L Q)``, columns unsorted."""
    sb = betas[1] if shampoo_beta is None else shampoo_beta
    W = W0.clone()
    k, N = W.dim(), W.numel()
    use = [(n <= max_dim) and (k > 1 or precondition_1d) for n in W.shape]
    dims = [i for i in range(k) if use[i]]
    L = [torch.zeros(n, n, dtype=W.dtype) if u else None for n, u in zip(W.shape, use)]
    s = [torch.full((n,), init ** -0.5, dtype=W.dtype) if u else None for n, u in zip(W.shape, use)]
    Q = None
    M = torch.zeros_like(W)
    V = torch.zeros_like(W)
    t = 0
    out = []

    for G in grads:
        if Q is None:
            for i in dims:
                Gi = unfold(G, i)
                L[i] = (1 - sb) * (W.shape[i] / N) * Gi @ Gi.T
            Q = [torch.linalg.eigh(L[i])[1].flip(1) if use[i] else None for i in range(k)]
            out.append(W.clone())
            continue
        t += 1
        M, V, step = adam_in_basis(G, M, V, Q, betas, eps, normalize)
        W = W - lr * step
        W = W - lr * wd * W
        new_L, new_s = list(L), list(s)
        for i in dims:
            whitened, scaled = G, rotate(G, Q)
            for j in dims:
                if j != i:
                    whitened = mode_multiply(whitened, (Q[j] * s[j]).T, j)  # G ×_j (Q_j diag(s_j))ᵀ
                    scaled = mode_multiply(scaled, torch.diag(s[j]), j)
            Gi = unfold(whitened, i)
            new_L[i] = sb * L[i] + (1 - sb) * (W.shape[i] / N) * Gi @ Gi.T
            d = sb / s[i].square() + (1 - sb) * unfold(scaled, i).square().mean(1)
            new_s[i] = d.rsqrt() if max_clamp is None else d.rsqrt().clamp(max=max(10, min(W.shape[i], max_clamp)))
        L, s = new_L, new_s
        if t % freq == 0:
            Morig = rotate(M, Q, transpose=True)
            for i in dims:
                Q[i] = torch.linalg.qr(L[i] @ Q[i])[0]
            M = rotate(Morig, Q)
        out.append(W.clone())
    return out


def adamw(W0, grads, *, lr, betas, eps, wd):
    beta1, beta2 = betas
    W = W0.clone()
    M = torch.zeros_like(W)
    V = torch.zeros_like(W)
    out = []
    for t, G in enumerate(grads, start=1):
        W = W * (1 - lr * wd)
        M = beta1 * M + (1 - beta1) * G
        V = beta2 * V + (1 - beta2) * G * G
        W = W - lr * (M / (1 - beta1**t)) / ((V / (1 - beta2**t)).sqrt() + eps)
        out.append(W.clone())
    return out

r"""KL-SOAP's preconditioner: SOAP's Adam in the factors' eigenbasis, with the factors estimated by KL
minimisation (Lin et al. 2025) from the bases and running eigenvalue estimates."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..engine import Bucket, commit_
from ..kronecker import factor_chunks, factor_matrices, factor_outer, mode_product, update_factors_
from ..linalg import LinAlgFailure, finite_bases
from ..refresh import count_refreshes_, counted_power_qr_
from .eigenbasis_adam import EigenbasisAdam

__all__ = ["KLEigenbasisAdam"]


class KLEigenbasisAdam(EigenbasisAdam):
    r""":class:`EigenbasisAdam` with KL-SOAP's factor statistics. Each preconditioned dim ``i`` of a block of
    ``N`` entries keeps, besides ``L_i`` and its basis ``Q_i``, estimates ``d_i`` of ``L_i``'s eigenvalues along
    ``Q_i`` (stored as ``s_i = d_i^{-1/2}``, clamped to ``max(10, min(n_i, max_clamp))``; ``s_i = init^{-1/2}``
    at the start). With ``W_j = Q_j diag(s_j)`` and ``P = G ×_j Q_jᵀ`` (all dims), one fold is, from the
    values before it:

    .. math::
        L_i &\leftarrow \beta L_i + (1-\beta)\,\tfrac{n_i}{N}\, \tilde G_{(i)} \tilde G_{(i)}^\top,\quad
            \tilde G = G \times_{j \ne i} W_j^\top \\
        d_i &\leftarrow \beta d_i + (1-\beta)\,\operatorname{mean}_{\ne i}\big((P \times_{j\ne i}
            \operatorname{diag}(s_j))^{\odot 2}\big)

    and every ``F`` updates ``Q_i ← qr(L_i Q_i)`` (power-QR with the columns kept in order, so ``d_i`` stays
    aligned), the first moment re-projected. The first step's statistic is ``(1-β)·(n_i/N)·G_(i)G_(i)ᵀ``."""

    def __init__(self, init_factor: float = 0.1, max_clamp: float | None = 4000.0) -> None:
        self.init_factor, self.max_clamp = init_factor, max_clamp

    def state(self, shape: tuple[int, ...], kind: tuple[bool, ...], dtype: torch.dtype,
              device: torch.device | str, packed: bool = False,
              basis_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        state = super().state(shape, kind, dtype, device, packed, basis_dtype)
        for i, (n, use) in enumerate(zip(shape, kind)):
            if use:
                state[f"inv_sqrt_eigenvalues{i}"] = torch.full((n,), self.init_factor ** -0.5, dtype=dtype,
                                                               device=device)
        return state

    def start(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> None:
        beta, state, numel = self._shampoo_beta(group), bucket.state, math.prod(bucket.shape)
        outers = {i: factor_outer(grads, i) * (n / numel) for i, n in enumerate(bucket.shape) if bucket.kind[i]}
        update_factors_(state, grads, beta, 1.0 - beta, ok, outers=outers)
        self.first_bases(bucket, ok, group)

    def fold(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> None:
        """The KL statistics into the factors and eigenvalue estimates, then new bases when due."""
        beta, state, numel = self._shampoo_beta(group), bucket.state, math.prod(bucket.shape)
        bases = factor_matrices(bucket, "basis")
        scales = factor_matrices(bucket, "inv_sqrt_eigenvalues")
        whiteners = [None if Q is None else Q * s[:, None, :] for Q, s in zip(bases, scales)]
        dims = [i for i, Q in enumerate(bases) if Q is not None]
        outers = {i: factor_outer(mode_product(grads, [W if j != i else None for j, W in enumerate(whiteners)]), i)
                  * (bucket.shape[i] / numel) for i in dims}
        projected = mode_product(grads, bases)
        diagonals = {i: _scaled(projected, scales, i).square().mean([d + 1 for d in range(len(bases)) if d != i])
                     for i in dims}
        update_factors_(state, grads, beta, 1.0 - beta, ok, outers=outers)
        for i in dims:
            commit_(scales[i], self._scales(scales[i], diagonals[i], beta), ok)
        if self.refreshes_at(bucket.calls, group):
            self.refresh_in_order(bucket, ok)

    def traces_refresh(self, group: dict[str, Any]) -> bool:
        return False  # power-QR whatever the group says: CholeskyQR's failures are read on the host

    def _scales(self, scale: Tensor, diagonal: Tensor, beta: float) -> Tensor:
        """``s ← (βd + (1-β)·diagonal)^{-1/2}`` with ``d = s^{-2}`` (0 where ``s`` is 0), clamped."""
        eigenvalues = torch.nan_to_num(1.0 / scale.square(), nan=0.0, posinf=0.0, neginf=0.0)
        scale = torch.nan_to_num(1.0 / torch.lerp(eigenvalues, diagonal, 1.0 - beta).sqrt(),
                                 nan=0.0, posinf=0.0, neginf=0.0)
        if self.max_clamp is not None:
            scale = scale.clamp(max=max(10.0, min(scale.shape[-1], self.max_clamp)))
        return scale

    @staticmethod
    def refresh_in_order(bucket: Bucket, ok: Tensor) -> None:
        """``Q_i ← qr(L_i Q_i)`` for every factor, columns unsorted; a failed QR keeps the basis (counted). The
        first moment follows into the new bases; the second moment stays, as in the authors' code."""
        state, bases = bucket.state, factor_matrices(bucket, "basis")
        moment = mode_product(state["exp_avg"], bases, transpose=True)
        changed = torch.zeros_like(ok)
        for i, basis in enumerate(bases):
            if basis is None:
                continue
            factors, stats = state[f"factor{i}"], state[f"stats{i}"]
            for part, factor in factor_chunks(factors, basis.shape[-1]):
                try:
                    new, _ = counted_power_qr_(factor, basis[part], stats[part], sort=False)
                    good = finite_bases(new)
                except LinAlgFailure:
                    new, good = basis[part], torch.zeros_like(ok[part])
                commit_(state[f"basis{i}"][part], new, ok[part] & good)
                count_refreshes_(stats[part], ok[part], good)
                changed[part] |= ok[part] & good
        commit_(state["exp_avg"], mode_product(moment, factor_matrices(bucket, "basis")), changed)


def _scaled(projected: Tensor, scales: list[Tensor | None], skip: int) -> Tensor:
    """``projected`` (``[B, n_1, …]``) times ``s_j`` along every dim ``j ≠ skip`` that has one."""
    for j, s in enumerate(scales):
        if s is not None and j != skip:
            shape = [s.shape[0]] + [1] * (projected.dim() - 1)
            shape[j + 1] = s.shape[1]
            projected = projected * s.view(shape)
    return projected

r"""EShampoo's preconditioner: the factors' eigenbases, with the eigenvalues re-estimated every step in them."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..engine import Bucket, commit_, per_block
from ..kronecker import factor_matrices, mode_product
from ..refresh import policy_of
from .base import KroneckerPreconditioner

__all__ = ["CorrectedEigenvalues"]


class CorrectedEigenvalues(KroneckerPreconditioner):
    r"""Bases ``Q_i = eigvecs(\hat L_i + εI)`` refreshed per the group's refresh policy (method, tolerance);
    every step ``D ← β₂D + (1-β₂)(G ×_1 Q_1ᵀ ⋯)^{⊙2}``; the direction
    ``[(\hat M ×_1 Q_1ᵀ ⋯) / (\sqrt{\hat D} + ε)] ×_1 Q_1 ⋯``. Identity bases until the first refresh: the
    method is then Adam in the parameter's basis, so an unfactored block needs no diagonal method."""

    matrix = "basis"
    needs_diagonal_when_unfactored = False

    def state(self, shape: tuple[int, ...], kind: tuple[bool, ...], group: dict[str, Any], dtype: torch.dtype,
              device: torch.device | str) -> dict[str, Tensor]:
        return {"eigenvalues": torch.zeros(shape, dtype=dtype, device=device)}

    def traces_refresh(self, group: dict[str, Any]) -> bool:
        return group["refresh_method"] == "refine"  # from the identity at the first refresh: no eigh at all

    def refresh(self, bucket: Bucket, bias2: Tensor, ok: Tensor, group: dict[str, Any]) -> None:
        def ridge(factor: Tensor, part: slice) -> Tensor:
            eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
            return factor / per_block(bias2[part], factor) + group["epsilon"] * eye

        policy_of(group).refresh_bucket_(bucket.state, bucket.kind, ok, bucket.state["eigenvalues"], ridge)

    def observe(self, bucket: Bucket, grads: Tensor, bias2: Tensor, ok: Tensor, group: dict[str, Any]) -> None:
        beta2 = group["betas"][1]
        rotated = mode_product(grads, factor_matrices(bucket, "basis"))
        eigenvalues = bucket.state["eigenvalues"]
        if beta2 == 1.0:
            new = eigenvalues.addcmul(rotated, rotated)
        else:
            new = (eigenvalues * beta2).addcmul_(rotated, rotated, value=1.0 - beta2)
        commit_(eigenvalues, new, ok, require_finite=True)

    def direction(self, bucket: Bucket, m_hat: Tensor, bias2: Tensor, group: dict[str, Any]) -> Tensor:
        bases = factor_matrices(bucket, "basis")
        eigenvalues = bucket.state["eigenvalues"]
        rotated = mode_product(m_hat, bases)
        rotated = rotated / ((eigenvalues / per_block(bias2, eigenvalues)).sqrt() + group["epsilon"])
        return mode_product(rotated, bases, transpose=True)

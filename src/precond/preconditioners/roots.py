r"""Shampoo's inverse roots ``R_i = (\hat L_i + \epsilon I)^{-1/(2k)}``, and KL-Shampoo's factor statistics."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .. import bias_correction as bc
from ..engine import Bucket, commit_, per_block
from ..kronecker import factor_chunks, factor_matrices, factor_outer, full_factor, mode_product, pack
from ..linalg import (LinAlgFailure, inverse_root_newton, inverse_roots, pseudo_inverse_roots, refined_inverse_roots,
                      shifted_eigh, spectral_function)
from ..refresh import QR_ITERATIONS, count_refreshes_
from .base import KroneckerPreconditioner

__all__ = ["InverseRoots", "KLInverseRoots", "inverse_exponent"]

# ``Var(λ̄)`` of factor ``i`` along the columns of ``Q`` (bucket, i, bias2, Q, part: the blocks of ``Q``): the
# variance-corrected inversion
EigenvalueVariance = Callable[[Bucket, int, Tensor, Tensor, slice], Tensor]


def inverse_exponent(order: int, group: dict[str, Any]) -> float:
    """The root's exponent for a block of ``order`` dims: ``1/(2·order)`` unless ``inverse_exponent_override``."""
    override = group["inverse_exponent_override"]
    if isinstance(override, dict):
        return override.get(order, 1.0 / (2 * order))
    return override if override is not None else 1.0 / (2 * order)


class InverseRoots(KroneckerPreconditioner):
    r"""``P = \hat M \times_1 R_1 \cdots \times_k R_k``, the roots recomputed at each refresh by ``eigh``
    (``root_method``), a coupled Newton iteration, a pseudo-inverse (``pseudo_inverse``) or, with
    ``variance``, the variance-corrected inversion of the microbatch bias correction. A failed root keeps
    the last good one and is counted."""

    matrix = "root"
    needs_diagonal_when_unfactored = True

    def __init__(self, variance: EigenvalueVariance | None = None) -> None:
        self.variance = variance

    def state(self, shape: tuple[int, ...], kind: tuple[bool, ...], group: dict[str, Any], dtype: torch.dtype,
              device: torch.device | str) -> dict[str, Tensor]:
        """With ``root_method="refine"``, each factor's eigenbasis ``basis{i}`` (identity until the first
        refresh), in ``preconditioner_dtype`` like the roots."""
        if group["root_method"] != "refine":
            return {}
        basis_dtype = group["preconditioner_dtype"] or dtype
        return {f"basis{i}": torch.eye(n, dtype=basis_dtype, device=device) for i, (n, use) in enumerate(zip(shape, kind))
                if use}

    def refresh(self, bucket: Bucket, bias2: Tensor, ok: Tensor, group: dict[str, Any]) -> None:
        exponent = inverse_exponent(len(bucket.shape), group)
        for i, use in enumerate(bucket.kind):
            if not use:
                continue
            factors, stored, stats = (bucket.state[f"{name}{i}"] for name in ("factor", "root", "stats"))
            for part, factor in factor_chunks(factors, bucket.shape[i]):
                factor = factor / per_block(bias2[part], factor)
                root, good = self._root(bucket, i, factor, exponent, bias2, ok[part], group, part)
                # a failed root keeps the last good one; a packed root keeps its upper triangle
                commit_(stored[part], root if stored.dim() == root.dim() else pack(root), ok[part] & good)
                count_refreshes_(stats[part], ok[part], good)

    def _root(self, bucket: Bucket, i: int, factor: Tensor, exponent: float, bias2: Tensor, ok: Tensor,
              group: dict[str, Any], part: slice) -> tuple[Tensor, Tensor]:
        """Factor ``i``'s new roots for the blocks ``part`` (``factor`` and ``ok`` are theirs), and which are
        good."""
        if self.variance is not None and bc.corrects_variance(group["bias_correction"]):
            return bc.corrected_inverse_roots(factor, exponent, group["epsilon"],
                                              lambda Q: self.variance(bucket, i, bias2, Q, part))
        if group["pseudo_inverse"]:
            return pseudo_inverse_roots(factor, exponent, group["rank_rtol"])
        if group["root_method"] == "refine":
            return self._refined_root(bucket, i, factor, exponent, ok, group, part)
        if group["root_method"] == "newton":
            try:
                return inverse_root_newton(factor, round(1.0 / exponent), group["epsilon"]), torch.ones_like(ok)
            except LinAlgFailure:
                return factor, torch.zeros_like(ok)
        return inverse_roots(factor, exponent, group["epsilon"])

    @staticmethod
    def _refined_root(bucket: Bucket, i: int, factor: Tensor, exponent: float, ok: Tensor, group: dict[str, Any],
                      part: slice) -> tuple[Tensor, Tensor]:
        """``root_method="refine"``: at the first refresh eigh's root and basis, after it the stored basis
        refined one step (the steps counted); the basis kept where the new root is good."""
        basis = bucket.state[f"basis{i}"]
        if bucket.calls == group["start_preconditioning_step"]:
            L, Q, good = shifted_eigh(factor, group["epsilon"])
            root, good = spectral_function(Q, L.pow(-exponent), good)
        else:
            root, Q, good, taken = refined_inverse_roots(factor, basis[part].to(factor.dtype), exponent,
                                                         group["epsilon"])
            bucket.state[f"stats{i}"][part, QR_ITERATIONS] += taken * ok
        commit_(basis[part], Q, ok & good)
        return root, good

    def direction(self, bucket: Bucket, m_hat: Tensor, bias2: Tensor, group: dict[str, Any]) -> Tensor:
        return mode_product(m_hat, _roots(bucket))


class KLInverseRoots(InverseRoots):
    r"""KL-Shampoo's factors (Lin et al. 2025): each factor's statistic is the gradient preconditioned along
    every *other* dim by that dim's current root, ``L_i ← β₂L_i + (1-β₂) G̃_(i)G̃_(i)ᵀ`` with
    ``G̃ = G ×_{j≠i} R_j``; the roots and the direction are :class:`InverseRoots`'."""

    def statistics(self, bucket: Bucket, grads: Tensor) -> dict[int, Tensor]:
        roots = _roots(bucket)
        return {i: factor_outer(mode_product(grads, [r if j != i else None for j, r in enumerate(roots)]), i)
                for i, root in enumerate(roots) if root is not None}


def _roots(bucket: Bucket) -> list[Tensor | None]:
    """The bucket's roots as ``[B, n, n]`` stacks (unpacked where ``packed_factors`` keeps triangles)."""
    return [None if root is None else full_factor(root) for root in factor_matrices(bucket, "root")]

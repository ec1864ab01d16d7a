"""The protocols the preconditioner components follow, on bucket stacks ``[B, n_1, …, n_k]``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

from ..engine import Bucket

__all__ = ["KroneckerPreconditioner", "MatrixPreconditioner"]


class KroneckerPreconditioner(ABC):
    """One step of a Kronecker-factored method, as the shared step calls it:

    1. :meth:`statistics`: the outer products the factors ``L_i`` accumulate, where they are not the
       gradient's own ``G_(i)G_(i)ᵀ`` (``None``: they are);
    2. :meth:`refresh`, when the refresh schedule says so: recompute what the factors feed (inverse
       roots, eigenbases) for the blocks with ``ok``, counting refreshes and failures in ``stats{i}``;
    3. :meth:`observe`, every step: statistics beyond the factors (corrected eigenvalues);
    4. :meth:`direction`: the preconditioned first moment.

    ``bias2`` is the per-block bias correction ``[B]`` of the factors (ones when off). Per-block state
    lives in ``bucket.state``: the factors ``factor{i}``, beside each one the matrix :attr:`matrix` names
    (``root{i}`` or ``basis{i}``, identity until the first refresh), and what :meth:`state` adds.
    """

    matrix: str = "root"  # the per-factor matrix kept next to each factor
    # whether a block with no factor (a 1-D parameter by default) needs a diagonal method: True where the
    # identity "preconditioner" would be plain momentum SGD (roots), False where this component already is
    # Adam in the identity basis (corrected eigenvalues)
    needs_diagonal_when_unfactored: bool = True

    def traces_refresh(self, group: dict[str, Any]) -> bool:
        """Whether :meth:`refresh` reads nothing on the host (matmuls only), so that a compiled step may trace
        it; refreshes by eigh read their failures on the host and run eagerly (see ``BlockEngine.step``)."""
        return False

    def state(self, shape: tuple[int, ...], kind: tuple[bool, ...], group: dict[str, Any], dtype: torch.dtype,
              device: torch.device | str) -> dict[str, Tensor]:
        """Per-block state beyond the factors and their matrices (``kind``: which dims have a factor); none by
        default."""
        return {}

    def statistics(self, bucket: Bucket, grads: Tensor) -> dict[int, Tensor] | None:
        """The factors' outer products where they are not the gradient's own; ``None`` by default."""
        return None

    @abstractmethod
    def refresh(self, bucket: Bucket, bias2: Tensor, ok: Tensor, group: dict[str, Any]) -> None:
        """Recompute the per-factor matrices from the factors, blocks with ``ok`` only."""

    def observe(self, bucket: Bucket, grads: Tensor, bias2: Tensor, ok: Tensor, group: dict[str, Any]) -> None:
        """Per-step statistics beyond the factors; none by default."""

    @abstractmethod
    def direction(self, bucket: Bucket, m_hat: Tensor, bias2: Tensor, group: dict[str, Any]) -> Tensor:
        """The preconditioned (bias-corrected) first moment ``m_hat``."""


class MatrixPreconditioner(ABC):
    """The rule a matrix optimizer (:class:`~precond.matrix.MatrixOptimizer`) applies to the stack
    ``[B, m, n]`` of its weight matrices (the other parameters run AdamW): :meth:`kind` separates matrices
    that need different state or arithmetic (ASGO's side), :meth:`state` is one matrix's, and
    :meth:`direction` turns the gradients (refused blocks zeroed, ``ok`` false) into directions."""

    def kind(self, shape: tuple[int, ...], group: dict[str, Any]) -> Hashable:
        return "matrix"

    def host_work_next(self, bucket: Bucket, group: dict[str, Any]) -> bool:
        """Whether the coming step's :meth:`direction` reads a flag on the host (a root by eigh); such a step
        runs eagerly, also when compiled (see ``BlockEngine.step``). None by default."""
        return False

    @abstractmethod
    def state(self, shape: tuple[int, ...], kind: Hashable, group: dict[str, Any], dtype: torch.dtype,
              device: torch.device | str) -> dict[str, Tensor]:
        """One matrix's state."""

    @abstractmethod
    def direction(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor:
        """The directions of the bucket's matrices."""

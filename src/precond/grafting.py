r"""Diagonal preconditioners, used for grafting and for blocks that get no Kronecker factor.

Per block, a second-moment accumulator ``V`` of the raw gradient ``G``:

=========  ==================================  ===================================
kind       update of ``V``                      direction ``D`` for an input ``X``
=========  ==================================  ===================================
sgd        (none)                               ``X``
adagrad    ``V ← V + G²``                       ``X / (√V + ε)``
rmsprop    ``V ← β₂V + (1-β₂)G²``               ``X / (√V + ε)``
adam       ``V ← β₂V + (1-β₂)G²``               ``X / (√(V / (1-β₂ᵗ)) + ε)``
=========  ==================================  ===================================

Grafting (Agarwal et al. 2020) rescales another method's direction ``P`` to the norm of ``D``, per block:
``P ← (‖D‖_F / (‖P‖_F + 1e-16)) · P``; the 1e-16 is Distributed Shampoo's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .engine import bias_correction, commit_, per_block

__all__ = ["GRAFTING_KINDS", "Diagonal", "graft"]

GRAFTING_KINDS = ("sgd", "adagrad", "rmsprop", "adam")


@dataclass(frozen=True)
class Diagonal:
    """A diagonal preconditioner of one of :data:`GRAFTING_KINDS`, on bucket stacks ``[B, …]``."""

    kind: str
    beta2: float
    epsilon: float

    @property
    def stateful(self) -> bool:
        return self.kind != "sgd"

    def update_(self, v: Tensor | None, grad: Tensor, ok: Tensor) -> None:
        """Fold ``grad`` into ``v`` for the blocks with ``ok``."""
        if self.kind == "sgd":
            return
        if self.kind == "adagrad":
            new = v.addcmul(grad, grad)
        else:
            new = (v * self.beta2).addcmul_(grad, grad, value=1.0 - self.beta2)
        commit_(v, new, ok, require_finite=True)

    def apply(self, v: Tensor | None, x: Tensor, step: Tensor) -> Tensor:
        """The direction for ``x``; ``step`` holds each block's step count (Adam's bias correction)."""
        if self.kind == "sgd":
            return x
        second = v / per_block(bias_correction(self.beta2, step, v.dtype), v) if self.kind == "adam" else v
        return x / (second.sqrt() + self.epsilon)


def graft(direction: Tensor, reference: Tensor) -> Tensor:
    """Each block of ``direction`` rescaled to the Frobenius norm of the same block of ``reference``."""
    dims = tuple(range(1, direction.dim()))
    return direction * (torch.linalg.vector_norm(reference, dim=dims, keepdim=True)
                        / (torch.linalg.vector_norm(direction, dim=dims, keepdim=True) + 1e-16))

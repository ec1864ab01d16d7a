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

__all__ = ["GRAFTING_KINDS", "Diagonal", "graft"]

GRAFTING_KINDS = ("sgd", "adagrad", "rmsprop", "adam")


@dataclass(frozen=True)
class Diagonal:
    """A diagonal preconditioner of one of :data:`GRAFTING_KINDS`."""

    kind: str
    beta2: float
    epsilon: float

    def init(self, block: Tensor, dtype: torch.dtype) -> Tensor | None:
        if self.kind == "sgd":
            return None
        return torch.zeros(block.shape, dtype=dtype, device=block.device)

    def update(self, v: Tensor | None, grad: Tensor) -> None:
        if self.kind == "sgd":
            return
        if self.kind == "adagrad":
            v.addcmul_(grad, grad)
        else:
            v.mul_(self.beta2).addcmul_(grad, grad, value=1.0 - self.beta2)

    def apply(self, v: Tensor | None, x: Tensor, step: int) -> Tensor:
        if self.kind == "sgd":
            return x
        second = v / (1.0 - self.beta2**step) if self.kind == "adam" else v
        return x / (second.sqrt() + self.epsilon)


def graft(direction: Tensor, reference: Tensor) -> Tensor:
    """``direction`` rescaled to the Frobenius norm of ``reference``."""
    return direction * (torch.linalg.vector_norm(reference) / (torch.linalg.vector_norm(direction) + 1e-16))

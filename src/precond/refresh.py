r"""When and how an eigenbasis is recomputed: one policy shared by EShampoo and SOAP.

Each Kronecker factor ``A`` with its current basis ``Q`` decides on its own:

- **fixed** (``tolerance = 0``): recompute whenever the optimizer asks (every ``precondition_frequency``
  steps);
- **adaptive** (``tolerance = τ > 0``, "Purifying Shampoo", Eschenhagen et al. 2025): with
  ``B = QᵀAQ``, keep ``Q`` if ``‖B - diag(B)‖_F ≤ τ·‖B‖_F``, recompute otherwise.

A recomputation is one of

- ``"eigh"``: a full symmetric eigen-decomposition;
- ``"qr"``: the warm-started QR algorithm, at most ``max_iterations`` steps, stopping early once the
  criterion holds;
- ``"power_qr"``: SOAP's single power-iteration step followed by QR.

A failed recomputation keeps the last basis and is counted; training goes on.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .linalg import LinAlgFailure, off_diagonal_ratio, power_qr_step, qr_algorithm, symmetric_eigh

__all__ = ["EigenbasisRefresh", "REFRESH_METHODS"]

REFRESH_METHODS = ("eigh", "qr", "power_qr")


@dataclass(frozen=True)
class EigenbasisRefresh:
    """Refresh policy. ``descending`` orders the basis by decreasing eigenvalue (SOAP's convention)."""

    method: str = "eigh"
    tolerance: float = 0.0
    max_iterations: int = 1
    descending: bool = False

    def __post_init__(self) -> None:
        if self.method not in REFRESH_METHODS:
            raise ValueError(f"refresh method must be one of {REFRESH_METHODS}, got {self.method!r}")
        if not 0.0 <= self.tolerance <= 1.0:
            raise ValueError(f"Invalid tolerance: {self.tolerance} (must be in [0, 1])")
        if self.max_iterations < 1:
            raise ValueError(f"Invalid max_iterations: {self.max_iterations} (must be >= 1)")

    def initial(self, A: Tensor, counters: dict[str, int]) -> Tensor | None:
        """First basis of ``A`` by eigh (``None`` if even the float64 retry fails)."""
        try:
            _, Q = symmetric_eigh(A)
        except LinAlgFailure:
            counters["failures"] += 1
            return None
        counters["refreshes"] += 1
        return torch.flip(Q, [1]) if self.descending else Q

    def refresh(self, A: Tensor, Q: Tensor, counters: dict[str, int]) -> tuple[Tensor, Tensor | None]:
        """Returns ``(basis, order)``: ``order`` is the column permutation of the old basis that the new
        one follows (for permuting per-column statistics), or ``None``."""
        try:
            if self.tolerance > 0.0 and off_diagonal_ratio(Q.T @ A @ Q) <= self.tolerance:
                counters["skipped"] += 1
                return Q, None
            if self.method == "eigh":
                _, Q_new = symmetric_eigh(A)
                order = None
                if self.descending:
                    Q_new = torch.flip(Q_new, [1])
            elif self.method == "qr":
                _, Q_new, iterations = qr_algorithm(A, Q, self.max_iterations, self.tolerance)
                counters["qr_iterations"] += iterations
                order = None
                if self.descending:  # qr_algorithm sorts ascending
                    Q_new = torch.flip(Q_new, [1])
            else:
                Q_new, order = power_qr_step(A, Q)
        except LinAlgFailure:
            counters["failures"] += 1
            return Q, None
        counters["refreshes"] += 1
        return Q_new, order

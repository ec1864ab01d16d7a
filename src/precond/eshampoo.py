"""Eigenvalue-corrected Shampoo (EShampoo) with Distributed Shampoo's argument names."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from .preconditioners import CorrectedEigenvalues
from .refresh import RULES as REFRESH_RULES
from .shampoo import ShampooFamily, shared_arguments

__all__ = ["EShampoo"]


class EShampoo(ShampooFamily):
    r"""Eigenvalue-corrected Shampoo ("Purifying Shampoo", Eschenhagen et al. 2025, arXiv:2506.03595;
    George et al. 2018).

    The eigenbasis comes from the Kronecker factors; the eigenvalues are re-estimated every step in
    that basis (the Frobenius-optimal correction towards full-matrix Adam), which removes the need for
    grafting. Per block ``G`` at step ``t``:

    .. math::
        L_i &\leftarrow \beta_2 L_i + (1-\beta_2)\, G_{(i)} G_{(i)}^\top \\
        Q_i &\leftarrow \operatorname{eigvecs}(\hat L_i + \epsilon I)
             \quad\text{refreshed per the policy (fixed every } F \text{ steps, or adaptive)} \\
        D &\leftarrow \beta_2 D + (1-\beta_2)\,(G \times_1 Q_1^\top \cdots)^{\odot 2} \\
        M &\leftarrow \beta_1 M + (1-\beta_1) G \\
        P &= \Big[\frac{\hat M \times_1 Q_1^\top \cdots \times_k Q_k^\top}{\sqrt{\hat D} + \epsilon}\Big]
             \times_1 Q_1 \cdots \times_k Q_k \\
        W &\leftarrow W - \text{lr}\,(P + \text{wd}\,W)

    Hats are bias corrections ``1/(1-β^t)``. Reproduces ``DistributedShampoo`` with
    ``EigenvalueCorrectedShampooPreconditionerConfig`` (eigh, fixed frequency) under the same
    hyper-parameters. Refresh policy (one decision per factor):

    Args:
        refresh_method: ``"eigh"`` (default), ``"qr"`` (warm-started QR algorithm), ``"power_qr"`` or
            ``"refine"`` (matmul-only refinement of the current basis, batched; fastest on a GPU).
        refresh_tolerance: τ of the adaptive criterion ``‖B - diag B‖_F ≤ τ‖B‖_F`` with ``B = QᵀLQ``;
            0 (default) always recomputes. Checked every ``precondition_frequency`` steps.
        max_qr_iterations: cap on QR-algorithm (or refinement) steps per refresh (default 1).
            Measured (``docs/reports/purifying.md``): on a GPU, ``refresh_method="refine"`` with
            ``precondition_frequency=1`` reaches eigh-every-step's loss at about the cost of eigh every 10
            steps; on GPT-2 small's body (with ``tf32=True``) it ends 0.875 nats/byte where eigh every 10
            steps ends 1.148 and AdamW 0.9275. The defaults stay those of the reference this class must equal.

    The remaining arguments are :class:`~precond.Shampoo`'s; defaults follow Distributed Shampoo's
    eigenvalue-corrected example (lr 1e-3, betas (0.9, 0.999), ``precondition_frequency`` 100).
    Grafting stays available but is off by default.
    ``distributed`` (``None``, ``"ddp"`` or a process group) splits the work between processes under DDP;
    FSDP2 parameters need nothing (:mod:`precond.engine.distribute`).

    ``strict=True`` raises ``FloatingPointError`` naming the parameter and block when a gradient or an update is
    not finite, instead of skipping that block's step and counting it (``preconditioner_stats()``).
    """

    _group_rules = {**ShampooFamily._group_rules, **REFRESH_RULES}

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 epsilon: float = 1e-12, weight_decay: float = 0.0, max_preconditioner_dim: int | float = 1024,
                 precondition_frequency: int = 100, start_preconditioning_step: int = -1,
                 use_bias_correction: bool = True, use_decoupled_weight_decay: bool = True,
                 grafting: str | None = None, grafting_beta2: float | None = None,
                 grafting_epsilon: float = 1e-10, refresh_method: str = "eigh", refresh_tolerance: float = 0.0,
                 max_qr_iterations: int = 1, precondition_1d: bool = False, merge_dims: bool = True,
                 large_dim_policy: str = "split", max_factor_ratio: float = 64.0, tf32: bool | str = False, *,
                 spectral_normalize: bool = False, packed_factors: bool = False,
                 preconditioner_dtype: torch.dtype | None = None, distributed: Any = None,
                 strict: bool = False) -> None:
        super().__init__(params, **shared_arguments(locals()),
                         extra=dict(refresh_method=refresh_method, refresh_tolerance=refresh_tolerance,
                                    max_qr_iterations=max_qr_iterations),
                         preconditioner=CorrectedEigenvalues())

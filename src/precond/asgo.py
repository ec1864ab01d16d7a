"""ASGO: one-sided Shampoo with a full-matrix preconditioner on one side of each weight matrix."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .matrix import MatrixOptimizer
from .preconditioners import OneSidedRoot
from .validation import STEP_RULES, betas_to_one_rule, check_choice, check_int, check_positive, pair

__all__ = ["ASGO"]


class ASGO(MatrixOptimizer):
    r"""ASGO (An et al. 2025, arXiv:2503.20762): Adaptive Structured Gradient Optimization.

    For a weight viewed as an ``m × n`` matrix, one full-matrix preconditioner on one side, by default
    the smaller (left if ``m ≤ n``):

    .. math::
        V &\leftarrow \beta_2 V + (1-\beta_2)\, G G^\top \quad(\beta_2 = 1:\ V \mathrel{+}= GG^\top,
            \text{ the analysed form}) \\
        M &\leftarrow \beta_1 M + (1-\beta_1) G \\
        P &= (V + \epsilon I)^{-1/2} M \quad\text{(right side: } M (V + \epsilon I)^{-1/2},\ V \text{ from } G^\top G) \\
        W &\leftarrow W - \text{lr}\,(P + \text{wd}\,W)

    the inverse root recomputed every ``precondition_frequency`` steps by ``"eigh"`` or the coupled
    ``"newton_schulz"`` iteration (``ns_steps`` matmul steps). With ``β₁ = β₂ = 0`` the update is
    ``(GGᵀ)^{-1/2} G``, the polar factor of ``G`` that Muon approximates.

    Defaults are the practical variant the authors used for GPT-2 pre-training (lr 1e-2, weight decay
    0.1, momentum 0.9, ``β₂`` 0.8, damping 1e-10). Parameters that are not matrices (and groups with
    ``"matrix": False``) run AdamW as in :class:`~precond.Muon`. The paper's head-wise variant for
    query/key matrices and the diagonal-other-side DASGO are not implemented. ``side="left"`` is the output
    side (``fan_out``), also in a group with ``"transposed": True`` (matrices stored ``(fan_in, fan_out)``,
    Hugging Face's ``Conv1D``; :func:`precond.param_groups` marks them).
    ``distributed`` (``None``, ``"ddp"`` or a process group) splits the work between processes under DDP;
    FSDP2 parameters need nothing (:mod:`precond.engine.distribute`).

    ``strict=True`` raises ``FloatingPointError`` naming the parameter and block when a gradient or an update is
    not finite, instead of skipping that block's step and counting it (``preconditioner_stats()``).
    """

    _group_rules = {**MatrixOptimizer._group_rules, **STEP_RULES, "betas": betas_to_one_rule,
                    "epsilon": check_positive}

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, betas: tuple[float, float] = (0.9, 0.8),
                 epsilon: float = 1e-10, weight_decay: float = 0.1, precondition_frequency: int = 1,
                 side: str = "auto", root_method: str = "eigh", ns_steps: int = 10,
                 adamw_lr: float = 3e-4, adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float = 0.1, *, distributed: Any = None, strict: bool = False) -> None:
        check_int("precondition_frequency", precondition_frequency, 1)
        check_choice("side", side, ("auto", "left", "right"))
        check_choice("root_method", root_method, ("eigh", "newton_schulz"))
        check_int("ns_steps", ns_steps, 1)
        defaults = dict(lr=lr, betas=pair(betas), epsilon=epsilon, weight_decay=weight_decay,
                        precondition_frequency=precondition_frequency, side=side, root_method=root_method,
                        ns_steps=ns_steps)
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas, adamw_eps=adamw_eps,
                         adamw_weight_decay=adamw_weight_decay, preconditioner=OneSidedRoot(),
                         distributed=distributed, strict=strict)

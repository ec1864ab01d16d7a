"""Muon on the engine, with torch.optim.Muon's arguments and automatic routing of non-matrix parameters."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from .engine import ADAM, Bucket
from .newton_schulz import Coefficients, per_step_coefficients
from .matrix import MatrixOptimizer, is_matrix
from .preconditioners import NS_DTYPES, Orthogonalized
from .preconditioners.orthogonal import NS_ALGORITHMS
from .validation import STEP_RULES, check_choice, check_int, check_positive, fraction_rule

__all__ = ["Muon"]

DEFAULT_ADAMW_LR = 3e-4  # Muon's reference recipe (Jordan et al. 2024) for the parameters it routes to AdamW


def adjusted_lr_ratio(adjust_lr_fn: str | None, rows: int, cols: int) -> float:
    """torch.optim.Muon's lr adjustment: ``"original"`` (None) ``√max(1, rows/cols)``;
    ``"match_rms_adamw"`` ``0.2·√max(rows, cols)`` (Moonlight, Liu et al. 2025)."""
    if adjust_lr_fn in (None, "original"):
        return math.sqrt(max(1.0, rows / cols))
    return 0.2 * math.sqrt(max(rows, cols))


class Muon(MatrixOptimizer):
    r"""Muon (Jordan et al. 2024): momentum orthogonalised by a Newton–Schulz iteration.

    For a weight viewed as a matrix ``G`` (``fan_out × fan_in·kernel`` for 3-D/4-D weights):

    .. math::
        B &\leftarrow \mu B + (1-\mu) G,\qquad U = (1-\mu) G + \mu B \ \text{(Nesterov) or } B \\
        O &= \operatorname{NS}_{a,b,c}^{(n)}\big(U / \max(\lVert U\rVert_F, \epsilon)\big) \approx
             \operatorname{polar}(U) \\
        W &\leftarrow W(1 - \text{lr}\cdot\text{wd}) - \text{lr}\cdot r(\text{shape})\, O

    with the quintic step ``A = XXᵀ; X ← aX + (bA + cA²)X`` (on the wide orientation) and ``r`` from
    ``adjust_lr_fn``. Follows ``torch.optim.Muon`` argument for argument on 2-D parameters. Beyond torch,
    ``ns_coefficients`` may also be ``ns_steps`` triples, one per step (e.g. Polar Express's, Amsel et al. 2025).

    Beyond torch: parameters that should not be orthogonalised (1-D ones, and those in a group with
    ``"matrix": False``, e.g. embeddings and the output head from :func:`precond.param_groups`) run AdamW
    with ``adamw_lr``, ``adamw_betas``, ``adamw_eps``, ``adamw_weight_decay`` (default: ``weight_decay``);
    torch's Muon refuses them. ``adamw_lr`` defaults to 3e-4, the AdamW rate of Keller Jordan's reference
    Muon recipe, since Muon's own rate (0.02 there) would be far too large for Adam; with
    ``adjust_lr_fn="match_rms_adamw"`` Muon's rate is AdamW-sized already and both share ``lr`` (Moonlight).
    ``ns_dtype`` selects the Newton–Schulz precision ("bfloat16" as torch, "float16", "float32", "float64").

    ``ns_algorithm="gram_newton_schulz"`` (Zhang, Amsel, Chen & Dao 2026; the default is
    ``"standard_newton_schulz"``, their Muon's names for the two) computes the same iteration through
    the Gram matrix ``R = XXᵀ``: ``P = aI + bR + cR²; Q ← QP; R ← PRP``, then ``X ← QX`` once at the end,
    restarting from ``X ← QX`` after each iteration in ``gram_newton_schulz_restart_iterations`` (1-based;
    default after the 2nd), which keeps half precision stable. Equal to the plain iteration in exact
    arithmetic, it takes ``8m²n + 28m³`` FLOPs for five steps against ``20m²n + 10m³`` on an ``m × n`` matrix
    (``m ≤ n``): 0.67× at ``n = 4m``, 0.74× at ``n = 3m``. Matrices with ``n ≤ 1.5m`` keep the plain
    iteration, where the Gram products cost more FLOPs (the authors' symmetric GEMM kernels halve them; these
    are torch's). Pair it with ``ns_dtype="float16"``, as its authors do: measured against the float64
    iteration it is then several times closer than the default bfloat16 plain iteration (BENCHMARKS.md,
    "Muon through the Gram matrix").

    The shape factor reads a matrix as ``(fan_out, fan_in)``, ``nn.Linear``'s layout; a group with
    ``"transposed": True`` holds matrices stored ``(fan_in, fan_out)`` (Hugging Face's ``Conv1D``), which
    :func:`precond.param_groups` marks so.
    ``distributed`` (``None``, ``"ddp"`` or a process group) splits the Newton–Schulz work between processes;
    under FSDP2 whole matrices are gathered, so the update is one process's (:mod:`precond.engine.distribute`).

    ``strict=True`` raises ``FloatingPointError`` naming the parameter and block when a gradient or an update is
    not finite, instead of skipping that block's step and counting it (``preconditioner_stats()``).
    """

    _group_rules = {**MatrixOptimizer._group_rules, **STEP_RULES, "momentum": fraction_rule, "eps": check_positive,
                    "ns_dtype": lambda name, value: check_choice(name, value, tuple(NS_DTYPES)),
                    "ns_algorithm": lambda name, value: check_choice(name, value, NS_ALGORITHMS)}

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_coefficients: Coefficients = (3.4445, -4.7750, 2.0315),
                 eps: float = 1e-7, ns_steps: int = 5, adjust_lr_fn: str | None = None,
                 ns_dtype: str = "bfloat16", ns_algorithm: str = "standard_newton_schulz",
                 gram_newton_schulz_restart_iterations: Iterable[int] = (2,), adamw_lr: float | None = None,
                 adamw_betas: tuple[float, float] = (0.9, 0.95), adamw_eps: float = 1e-8,
                 adamw_weight_decay: float | None = None, *, distributed: Any = None, strict: bool = False) -> None:
        check_int("ns_steps", ns_steps, 1)
        if ns_steps >= 100:
            raise ValueError(f"Invalid ns_steps: {ns_steps} (must be < 100)")
        try:
            per_step = per_step_coefficients(ns_coefficients, ns_steps)
        except (TypeError, ValueError):
            raise ValueError(f"Invalid ns_coefficients: {ns_coefficients!r} (must be three numbers a, b, c, or "
                             f"ns_steps = {ns_steps} such triples, one per step)") from None
        one_triple = all(isinstance(v, (int, float)) for v in ns_coefficients)  # as torch.optim.Muon keeps it
        coefficients = tuple(ns_coefficients) if one_triple else tuple(per_step)
        check_choice("adjust_lr_fn", adjust_lr_fn, (None, "original", "match_rms_adamw"))
        restarts = tuple(gram_newton_schulz_restart_iterations)  # ns_dtype, ns_algorithm: the group rules
        if not all(isinstance(t, int) and 1 <= t < ns_steps for t in restarts):
            raise ValueError(f"Invalid gram_newton_schulz_restart_iterations: {restarts!r} (each an iteration "
                             f"after which to restart, an int from 1 to ns_steps - 1 = {ns_steps - 1})")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_coefficients=coefficients, eps=eps, ns_steps=ns_steps,
                        adjust_lr_fn=adjust_lr_fn, ns_dtype=ns_dtype, ns_algorithm=ns_algorithm,
                        gram_newton_schulz_restart_iterations=restarts)
        if adamw_lr is None:
            adamw_lr = lr if adjust_lr_fn == "match_rms_adamw" else DEFAULT_ADAMW_LR
        super().__init__(params, defaults, adamw_lr=adamw_lr, adamw_betas=adamw_betas,
                         adamw_eps=adamw_eps,
                         adamw_weight_decay=weight_decay if adamw_weight_decay is None else adamw_weight_decay,
                         preconditioner=Orthogonalized(), distributed=distributed, strict=strict)

    def _direction_dtype(self, bucket: Bucket) -> torch.dtype:
        return bucket.dtype if bucket.kind == ADAM else NS_DTYPES[bucket.group["ns_dtype"]]

    def _whole_matrix(self, param: Tensor, group: dict[str, Any]) -> bool:
        return is_matrix(group, param) and param.dim() >= 2  # Newton–Schulz needs the whole matrix

    def _direction_scale(self, bucket: Bucket, group: dict[str, Any]) -> float:
        if bucket.kind == ADAM:
            return 1.0
        rows, cols = bucket.shape
        if group.get("transposed", False):  # stored (fan_in, fan_out): Hugging Face's Conv1D
            rows, cols = cols, rows
        return adjusted_lr_ratio(group["adjust_lr_fn"], rows, cols)

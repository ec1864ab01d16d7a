r"""Shampoo with Distributed Shampoo's argument names, defaults and order of operations.

Shared with :class:`~precond.eshampoo.EShampoo` and :class:`~precond.kl_shampoo.KLShampoo` through
:class:`ShampooFamily`: blocking, the factor statistics, the first moment, grafting and the start/refresh
schedule. They differ only in their preconditioner component (:mod:`precond.preconditioners`): what it
computes from the factors and how it applies it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import bias_correction as bc
from .blocks import BlockLayout
from .engine import BlockEngine, Bucket, bias_correction, commit_, per_block
from .grafting import GRAFTING_KINDS, Diagonal, graft
from .kronecker import factor_outer, init_factor_state, unfold, update_factors_
from .precision import TF32_MODES
from .preconditioners import InverseRoots, KroneckerPreconditioner
from .refresh import refresh_due
from .validation import (STEP_RULES, betas_to_one_rule, check_betas, check_choice, check_int, check_max_dim,
                         check_nonneg, check_positive, flag_rule, pair, preconditioner_dtype_rule)

__all__ = ["Shampoo", "ShampooFamily"]

ROOT_METHODS = ("eigh", "newton", "refine")

_GRAFTING_BETA2 = {"adam": 0.999, "rmsprop": 0.99, "adagrad": 1.0, "sgd": 1.0}

# The constructor arguments Shampoo and EShampoo share (Distributed Shampoo's names).
SHARED_ARGUMENTS = ("lr", "betas", "epsilon", "weight_decay", "max_preconditioner_dim", "precondition_frequency",
                    "start_preconditioning_step", "use_bias_correction", "use_decoupled_weight_decay", "grafting",
                    "grafting_beta2", "grafting_epsilon", "precondition_1d", "merge_dims", "large_dim_policy",
                    "max_factor_ratio", "tf32", "spectral_normalize", "packed_factors", "preconditioner_dtype",
                    "distributed", "strict")


def shared_arguments(arguments: dict[str, Any]) -> dict[str, Any]:
    """The :data:`SHARED_ARGUMENTS` out of a constructor's ``locals()``."""
    return {name: arguments[name] for name in SHARED_ARGUMENTS}


def _checked_defaults(*, lr: float, betas: tuple[float, float], epsilon: float, weight_decay: float,
                      max_preconditioner_dim: int | float, precondition_frequency: int,
                      start_preconditioning_step: int, use_bias_correction: bool,
                      use_decoupled_weight_decay: bool, grafting: str | None, grafting_beta2: float | None,
                      grafting_epsilon: float, precondition_1d: bool, merge_dims: bool, large_dim_policy: str,
                      max_factor_ratio: float, tf32: bool | str, spectral_normalize: bool, packed_factors: bool,
                      preconditioner_dtype: torch.dtype | None, extra: dict[str, Any]) -> dict[str, Any]:
    """The family's arguments checked, as a param group's defaults (a start of ``-1``: the frequency)."""
    check_max_dim("max_preconditioner_dim", max_preconditioner_dim)
    check_int("precondition_frequency", precondition_frequency, 1)
    if start_preconditioning_step != -1:
        check_int("start_preconditioning_step", start_preconditioning_step, 1)
    check_choice("grafting", grafting, (None, *GRAFTING_KINDS))
    if grafting_beta2 is None:
        grafting_beta2 = _GRAFTING_BETA2.get(grafting, 0.999)
    if grafting in ("adam", "rmsprop"):
        check_betas((0.0, grafting_beta2), name="grafting_beta2 (as betas)")
    check_positive("grafting_epsilon", grafting_epsilon)
    check_choice("large_dim_policy", large_dim_policy, ("split", "identity"))
    check_choice("tf32", tf32, TF32_MODES)
    return dict(lr=lr, betas=pair(betas), epsilon=epsilon, weight_decay=weight_decay,
                max_preconditioner_dim=max_preconditioner_dim, precondition_frequency=precondition_frequency,
                start_preconditioning_step=(precondition_frequency if start_preconditioning_step == -1
                                            else start_preconditioning_step),
                use_bias_correction=use_bias_correction, use_decoupled_weight_decay=use_decoupled_weight_decay,
                grafting=grafting, grafting_beta2=grafting_beta2, grafting_epsilon=grafting_epsilon,
                precondition_1d=precondition_1d, merge_dims=merge_dims, large_dim_policy=large_dim_policy,
                max_factor_ratio=max_factor_ratio, tf32=tf32, spectral_normalize=spectral_normalize,
                packed_factors=packed_factors, preconditioner_dtype=preconditioner_dtype, **extra)


class ShampooFamily(BlockEngine):
    """The step Shampoo, KL-Shampoo and EShampoo share around their ``preconditioner`` component; see
    :class:`Shampoo` for the arguments."""

    _skip_advice = "lower lr, set grafting or raise epsilon"
    _group_rules = {**STEP_RULES, "betas": betas_to_one_rule, "epsilon": check_positive,
                    "max_factor_ratio": check_positive, "spectral_normalize": flag_rule, "packed_factors": flag_rule,
                    "preconditioner_dtype": preconditioner_dtype_rule}

    def __init__(self, params: Iterable[Any], *, distributed: Any, strict: bool,
                 preconditioner: KroneckerPreconditioner, **arguments: Any) -> None:
        self.preconditioner = preconditioner
        super().__init__(params, _checked_defaults(**arguments), distributed=distributed, strict=strict)

    # ---------------------------------------------------------------------- engine hooks
    def _weight_decay_mode(self, group: dict[str, Any]) -> str:
        return "decoupled" if group["use_decoupled_weight_decay"] else "l2"

    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        layout = BlockLayout.build(tuple(param.shape), group["max_preconditioner_dim"],
                                   "trailing" if group["merge_dims"] else "none", group["large_dim_policy"],
                                   group["max_factor_ratio"])
        return self._note_guard(param, layout, group["precondition_1d"])

    def _diagonal(self, group: dict[str, Any], has_factors: bool) -> Diagonal | None:
        """The grafted method; for a block with no Kronecker factor it is also the method itself
        (Adam with ``betas[1]`` when no grafting is set, AdaGrad when ``betas[1] == 1``)."""
        if group["grafting"] is not None:
            return Diagonal(group["grafting"], group["grafting_beta2"], group["grafting_epsilon"])
        if has_factors or not self.preconditioner.needs_diagonal_when_unfactored:
            return None
        beta2 = group["betas"][1]
        return Diagonal("adagrad" if beta2 == 1.0 else "adam", beta2, group["grafting_epsilon"])

    def _block_kind(self, layout: BlockLayout, index: int, group: dict[str, Any]) -> tuple[bool, ...]:
        return layout.preconditioned_dims(index, group["precondition_1d"])

    def _init_block(self, shape, kind, group, dtype, device):
        state = init_factor_state(shape, kind, dtype, device, matrix=self.preconditioner.matrix,
                                  packed=group["packed_factors"], matrix_dtype=group["preconditioner_dtype"])
        diagonal = self._diagonal(group, any(kind))
        if diagonal is not None and diagonal.stateful:
            state["diagonal"] = torch.zeros(shape, dtype=dtype, device=device)
        if group["betas"][0] > 0.0:
            state["momentum"] = torch.zeros(shape, dtype=dtype, device=device)
        state.update(self.preconditioner.state(shape, kind, group, dtype, device))
        return state

    def _directions(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor:
        beta1, beta2 = group["betas"]
        state, step, t = bucket.state, bucket.state["step"], bucket.calls
        grads, outers = self._statistics(bucket, grads)
        if outers is None:
            outers = self.preconditioner.statistics(bucket, grads)
        if self._folds(bucket, t):
            update_factors_(state, grads, beta2, 1.0 if beta2 == 1.0 else 1.0 - beta2, ok, outers)
        has_factors = any(bucket.kind)
        diagonal = self._diagonal(group, has_factors)
        if diagonal is not None:
            diagonal.update_(state.get("diagonal"), grads, ok)
        bias2 = (bias_correction(beta2, step, grads.dtype) if group["use_bias_correction"] and beta2 < 1.0
                 else torch.ones(len(bucket), dtype=grads.dtype, device=grads.device))
        if self._refreshes(bucket, t):
            self.preconditioner.refresh(bucket, bias2, ok, group)
        self.preconditioner.observe(bucket, grads, bias2, ok, group)

        if beta1 > 0.0:
            momentum = state["momentum"]
            commit_(momentum, momentum.lerp(grads, 1.0 - beta1), ok)
            m_hat = (momentum / per_block(bias_correction(beta1, step, momentum.dtype), momentum)
                     if group["use_bias_correction"] else momentum)
        else:
            m_hat = grads
        unfactored = not has_factors and self.preconditioner.needs_diagonal_when_unfactored
        before_start = t < group["start_preconditioning_step"] and group["grafting"] is not None
        if unfactored or before_start:  # the diagonal method alone
            return diagonal.apply(state.get("diagonal"), m_hat, step)
        direction = self.preconditioner.direction(bucket, m_hat, bias2, group)
        if group["grafting"] is not None:
            direction = graft(direction, diagonal.apply(state.get("diagonal"), m_hat, step))
        return direction

    def _host_work_next(self, bucket: Bucket) -> bool:
        return self._refreshes(bucket, bucket.calls + 1) and not self.preconditioner.traces_refresh(bucket.group)

    @staticmethod
    def _refreshes(bucket: Bucket, t: int) -> bool:
        """Whether step ``t`` (from 1) recomputes the bucket's roots or bases."""
        group = bucket.group
        return any(bucket.kind) and refresh_due(t, group["precondition_frequency"], group["start_preconditioning_step"])

    # ------------------------------------------- what a member's bias correction supplies (Shampoo's)
    def _folds(self, bucket: Bucket, t: int) -> bool:
        """Whether step ``t`` adds its statistic to the factors (every step by default)."""
        return True

    def _statistics(self, bucket: Bucket, grads: Tensor) -> tuple[Tensor, dict[int, Tensor] | None]:
        """The gradient the first moment and grafting see, and the factors' outer products where they do not
        come from it (``None``); bias-corrected Shampoo cross-fits them."""
        return grads, None


class Shampoo(bc.MicrobatchCorrection, ShampooFamily):
    r"""Shampoo (Gupta et al. 2018) as in Distributed Shampoo (Shi et al. 2023, arXiv:2309.06497).

    Per block ``G`` of order ``k`` (after merging small dims and splitting dims longer than
    ``max_preconditioner_dim``), at step ``t``:

    .. math::
        L_i &\leftarrow \beta_2 L_i + (1-\beta_2)\, G_{(i)} G_{(i)}^\top
              \quad(\beta_2 = 1:\ L_i \mathrel{+}= G_{(i)} G_{(i)}^\top) \\
        R_i &\leftarrow (\hat L_i + \epsilon I)^{-1/(2k)}
              \quad\text{every } F \text{ steps from } t_0,\ \hat L_i = L_i/(1-\beta_2^t) \\
        M &\leftarrow \beta_1 M + (1-\beta_1) G,\quad \hat M = M / (1-\beta_1^t) \\
        P &= \hat M \times_1 R_1 \cdots \times_k R_k,\qquad
        P \leftarrow \frac{\lVert D(\hat M) \rVert_F}{\lVert P \rVert_F} P \ \text{(grafting)} \\
        W &\leftarrow W - \text{lr}\,(P + \text{wd}\, W)

    where ``D`` is the grafted method's direction (SGD, AdaGrad, RMSprop or Adam on ``\hat M``). Before
    ``start_preconditioning_step`` (``t0``; ``-1`` means ``precondition_frequency``) ``P = D`` when
    grafting is set. With the same hyper-parameters this reproduces ``DistributedShampoo`` with its
    default root-inverse configuration (set ``precondition_1d=True`` for its treatment of 1-D tensors).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (default 1e-2).
        betas: ``(beta1, beta2)``; ``beta1`` for the first moment (0 disables it), ``beta2`` for the
            factors (1.0 = AdaGrad-style sum). Default (0.9, 1.0).
        epsilon: added to the factors before the inverse root (default 1e-12).
        weight_decay: weight decay coefficient (default 0).
        max_preconditioner_dim: longest factor; longer dims are split into blocks (default 1024).
        precondition_frequency: recompute the roots every this many steps (default 1).
        start_preconditioning_step: first step that uses the roots; -1 = ``precondition_frequency``.
        use_bias_correction: bias-correct the first moment and (``beta2 < 1``) the factors (default True).
        use_decoupled_weight_decay: AdamW-style decay (default) or L2 added to the gradient.
        grafting: ``"adam"``, ``"adagrad"``, ``"rmsprop"``, ``"sgd"`` or ``None`` (default).
        grafting_beta2: second-moment decay of the grafted method (default 0.999 Adam, 0.99 RMSprop).
        grafting_epsilon: epsilon of the grafted method (default 1e-10).
        inverse_exponent_override: exponent ``p`` in ``(L+εI)^{-p}`` instead of ``1/(2k)``: a float for
            every order, or ``{order: exponent}``.
        root_method: ``"eigh"`` (default), ``"newton"`` (coupled Newton; needs ``1/p`` integral) or
            ``"refine"``: each factor keeps the eigenbasis its root was made from (``eigh`` at the first
            refresh), and later refreshes refine it by one matmul-only step
            (:func:`precond.linalg.refined_inverse_roots`), the root ``Q diag(diag(QᵀMQ)^{-p}) Qᵀ``. Batched
            products only (fast on a GPU, no LAPACK after the first refresh); one more ``n × n`` matrix per
            factor. Exact where the basis has converged; the refresh after a large change of the factors is
            an approximation that the next ones refine. Measured (BENCHMARKS.md, "Shampoo's roots from a
            refined eigenbasis"): at F=10 and ε=1e-12 it trails ``"eigh"`` on the CPU preset (final loss 2.34
            against 2.14): the small eigenvalues read off an inexact basis take the large ones' leakage, and
            their inverse roots are what Shampoo amplifies. Prefer ``"eigh"`` unless the refresh cost rules.
        precondition_1d: give 1-D parameters a full factor instead of the diagonal method (default False).
        merge_dims: merge adjacent small dims as Distributed Shampoo does (default True).
        large_dim_policy: ``"split"`` dims longer than ``max_preconditioner_dim`` into blocks (default) or
            leave them un-preconditioned (``"identity"``).
        max_factor_ratio: memory guard (default 64): a dim of length ``n`` in a block of ``m`` elements gets
            a factor only if ``n² <= max_factor_ratio·m``, and dims merge only while that holds, so a 1×N
            matrix runs the diagonal method and a 32×32 one keeps two 32×32 factors (Distributed Shampoo
            gives them 1024×1024 factors: 1024× the block). Said once per parameter (logging).
            ``float("inf")`` is Distributed Shampoo's layout.
        tf32: float32 matmuls on CUDA (:mod:`precond.precision`): ``False`` (default) IEEE float32, ``True``
            TF32 tensor cores (~1e-3 relative), ``"3x"`` three TF32 passes per product (float32-class accuracy;
            ~0.6× the time of ``False`` on 2304² and larger, no gain on 768²); the global setting is left as it was.
        spectral_normalize: rescale each block's update (after grafting) to spectral norm
            ``sqrt(d_out/d_in)`` (default False), the explicit normalisation that Qiu et al. (arXiv:2512.05620)
            find steadies the best rate across widths; with it a hidden layer's rate needs no width
            multiplier (:mod:`precond.scaling`). Costs 32 pairs of matrix-vector products per block.
        packed_factors: keep each Kronecker factor and each inverse root (both symmetric) as its upper
            triangle, ``n(n+1)/2`` numbers instead of ``n²`` (default False), as Distributed Shampoo keeps them:
            the state then equals Distributed Shampoo's. A factor is updated packed (its statistic packed by
            one gather) and unpacked to be read at a refresh; a root is unpacked for every step's direction
            (one bucket's at a time).
        preconditioner_dtype: keep the inverse roots (EShampoo: the eigenbases) in this dtype
            (``torch.bfloat16``, ``torch.float16``; default ``None``: the state's), read back in the state's
            dtype for every product (Distributed Shampoo's ``inv_factor_matrix_dtype`` and
            ``factor_matrix_eigenvectors_dtype``). Halves those matrices' memory; factors and arithmetic stay.
        bias_correction: ``"std"`` (default), ``"cross_fit"``, ``"variance_corrected"`` or ``"full"``, per
            group (:mod:`precond.bias_correction`, Nayak et al. 2026), from microbatch statistics collected by
            :meth:`accumulate`. With ``Ĝ_j`` microbatch ``j``'s gradient: ``"cross_fit"`` feeds the first
            moment and grafting the mean ``Ĝ`` of group A and each factor the mean of ``Ĝ_jĜ_jᵀ`` (its
            unfolding) over group B; ``"variance_corrected"`` replaces each eigenvalue's inverse root
            at a refresh by ``max(0, λ^{-p} − ½p(p+1)λ^{-p-2} Var(λ̄))``, ``Var(λ̄)`` the variance over the
            microbatches (divided by their count) of ``q_kᵀ(β₂L + (1-β₂)Ĝ_jĜ_jᵀ)q_k`` (bias-corrected like
            ``L``) measured along the eigenvectors ``q_k`` this refresh computes, as the authors' code does;
            ``"full"`` does both (variance over group B). Needs ``root_method="eigh"`` for the variance modes.
            Extra memory while accumulating: a gradient and one matrix per factor; on refresh steps the variance
            modes keep the microbatch gradients (of group B) until the refresh. Blocks without a factor (1-D
            parameters unless ``precondition_1d``) run their diagonal method on group A's gradient,
            uncorrected. The authors' Shampoo is this class with ``use_bias_correction=False``,
            ``fold_at_refresh_only=True``, ``betas=(0.9, 0.95)``, ``epsilon=1e-6`` and no grafting.
        fold_at_refresh_only: update the factors only on refresh steps, from that step's statistic (the
            authors' bias-corrected Shampoo; default False: every step, as Distributed Shampoo).
        cross_fit_fraction: the share of a step's microbatches in group A (default 0.5).
        pseudo_inverse: use the pseudo-inverse root (default False): eigenvalues at or below ``rank_rtol · λ_max``
            count as zero and get a zero root, as Distributed Shampoo's ``PseudoInverseConfig`` does; for
            rank-deficient factors (a gradient of low rank for many steps). Takes ``epsilon=0.0``.
        rank_rtol: the relative cutoff of ``pseudo_inverse`` (default ``None``: ``n`` times the machine epsilon).
        strict: raise ``FloatingPointError`` naming the parameter and block when a gradient or an update is not
            finite, instead of skipping that block's step and counting it (default False).
        distributed: ``None`` (one process, or FSDP2 ``DTensor`` parameters), ``"ddp"`` or a process
            group: split the work between processes (:mod:`precond.engine.distribute`).
    """

    _group_rules = {**ShampooFamily._group_rules, **bc.RULES, "epsilon": check_nonneg, "pseudo_inverse": flag_rule,
                    "fold_at_refresh_only": flag_rule,
                    "root_method": lambda name, value: check_choice(name, value, ROOT_METHODS),
                    "rank_rtol": lambda name, v: v is None or check_nonneg(name, v)}

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, betas: tuple[float, float] = (0.9, 1.0),
                 epsilon: float = 1e-12, weight_decay: float = 0.0, max_preconditioner_dim: int | float = 1024,
                 precondition_frequency: int = 1, start_preconditioning_step: int = -1,
                 use_bias_correction: bool = True, use_decoupled_weight_decay: bool = True,
                 grafting: str | None = None, grafting_beta2: float | None = None,
                 grafting_epsilon: float = 1e-10, inverse_exponent_override: float | dict[int, float] | None = None,
                 root_method: str = "eigh", precondition_1d: bool = False, merge_dims: bool = True,
                 large_dim_policy: str = "split", max_factor_ratio: float = 64.0, tf32: bool | str = False, *,
                 spectral_normalize: bool = False, packed_factors: bool = False,
                 preconditioner_dtype: torch.dtype | None = None, pseudo_inverse: bool = False,
                 rank_rtol: float | None = None,
                 bias_correction: str = "std", cross_fit_fraction: float = 0.5, fold_at_refresh_only: bool = False,
                 distributed: Any = None, strict: bool = False) -> None:
        if isinstance(inverse_exponent_override, dict):
            for order, exponent in inverse_exponent_override.items():
                check_positive(f"inverse_exponent_override[{order}]", exponent)
        elif inverse_exponent_override is not None:
            check_positive("inverse_exponent_override", inverse_exponent_override)
        if root_method == "newton" and inverse_exponent_override is not None:
            exponents = (inverse_exponent_override.values() if isinstance(inverse_exponent_override, dict)
                         else [inverse_exponent_override])
            if any(abs(1.0 / e - round(1.0 / e)) > 1e-9 for e in exponents):
                raise ValueError(f"Invalid inverse_exponent_override: {inverse_exponent_override} "
                                 "(root_method='newton' needs exponents 1/p with p an integer)")
        super().__init__(params, **shared_arguments(locals()),
                         extra=dict(inverse_exponent_override=inverse_exponent_override, root_method=root_method,
                                    pseudo_inverse=pseudo_inverse, rank_rtol=rank_rtol,
                                    bias_correction=bias_correction, cross_fit_fraction=cross_fit_fraction,
                                    fold_at_refresh_only=fold_at_refresh_only),
                         preconditioner=self._make_preconditioner())

    def _make_preconditioner(self) -> KroneckerPreconditioner:
        """The component this class runs (KL-Shampoo: another)."""
        return InverseRoots(variance=self._eigenvalue_variance)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["pseudo_inverse"]:
            if group["epsilon"] != 0.0:
                raise ValueError(f"Invalid epsilon: {group['epsilon']} (pseudo_inverse=True takes epsilon=0.0: "
                                 "rank_rtol decides which eigenvalues count as zero)")
            if group["root_method"] != "eigh" or bc.corrects_variance(group["bias_correction"]):
                raise ValueError("Invalid pseudo_inverse: True (it needs root_method='eigh' and no variance "
                                 "bias correction)")
        elif group["epsilon"] <= 0.0:
            raise ValueError(f"Invalid epsilon: {group['epsilon']} (must be > 0, or 0.0 with pseudo_inverse=True)")
        if bc.corrects_variance(group["bias_correction"]) and group["root_method"] != "eigh":
            raise ValueError(f"Invalid bias_correction: {group['bias_correction']!r} (the variance correction "
                             "acts on eigenvalues: it needs root_method='eigh')")

    def _folds(self, bucket: Bucket, t: int) -> bool:
        return not bucket.group["fold_at_refresh_only"] or self._refreshes(bucket, t)

    # ----------------------------------------------------------------- bias correction
    def _statistics(self, bucket, grads):
        if not bc.crosses(bucket.group["bias_correction"]):
            return grads, None
        micro = self._micro_state(bucket)
        n_b = micro["n"] - micro["n_a"]
        outers = {i: micro[f"outer{i}"] / n_b for i, use in enumerate(bucket.kind) if use}
        return micro["numer_sum"] / micro["n_a"], outers

    def _fold_microbatch(self, bucket: Bucket, grad: Tensor, index: int, n_a: int) -> None:
        mode, micro, kind = bucket.group["bias_correction"], bucket.micro, bucket.kind
        factored = [i for i, use in enumerate(kind) if use]
        if bc.crosses(mode):
            sums = {"numer_sum": grad} if index < n_a else {f"outer{i}": factor_outer(grad, i) for i in factored}
            for name, value in sums.items():
                bc.add_(micro, name, value)
        # the variance is needed at refreshes only, along the eigenvectors that refresh computes: the
        # microbatch gradients wait for them
        if bc.corrects_variance(mode) and index >= n_a and self._refreshes(bucket, bucket.calls + 1):
            micro.setdefault("variance_grads", []).append(grad)

    def _eigenvalue_variance(self, bucket: Bucket, i: int, bias2: Tensor, Q: Tensor, part: slice) -> Tensor:
        """``Var(λ̄)`` of factor ``i`` along the columns ``q_k`` of ``Q`` (the blocks ``part``): the variance over
        the microbatches of ``‖q_kᵀĜ_j,(i)‖²``, over their count, times the factor's weight, bias-corrected as
        the factor is."""
        micro, beta2 = self._micro_state(bucket), bucket.group["betas"][1]
        weight = 1.0 if beta2 == 1.0 else 1.0 - beta2
        along = torch.stack([(Q.mT @ unfold(grad[part], i)).square().sum(-1) for grad in micro["variance_grads"]])
        variance = along.var(0, unbiased=True) / along.shape[0]  # ‖q_kᵀ Ĝ_j,(i)‖² over j: Var(mean)
        return variance * (weight / bias2[part]).square().unsqueeze(-1)

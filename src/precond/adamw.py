"""AdamW on the engine: the diagonal path as a public optimizer, and the rule Muon and ASGO route to."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import bias_correction as bc
from .blocks import BlockLayout
from .engine import ADAM, BlockEngine, Bucket, bias_correction, commit_, per_block
from .engine.batched import decay_
from .validation import STEP_RULES, betas_rule, check_positive, pair

__all__ = ["AdamW", "adam_state", "adam_directions"]


def adam_state(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device | str) -> dict[str, Tensor]:
    return {"exp_avg": torch.zeros(shape, dtype=dtype, device=device),
            "exp_avg_sq": torch.zeros(shape, dtype=dtype, device=device)}


def adam_directions(bucket: Bucket, grads: Tensor, ok: Tensor, betas: tuple[float, float], eps: float) -> Tensor:
    r"""Adam's directions ``m̂ / (√v̂ + ε)`` for a stacked bucket, in ``torch.optim.AdamW``'s arithmetic order.

    Used where torch's fused kernel cannot be (parameters in bf16/fp16 with float32 state).
    """
    beta1, beta2 = betas
    step, exp_avg, exp_avg_sq = bucket.state["step"], bucket.state["exp_avg"], bucket.state["exp_avg_sq"]
    # In place: a refused block's gradient is zero, and its weights (0 and 1) leave it as it was.
    exp_avg.lerp_(grads, per_block(ok.to(grads.dtype) * (1.0 - beta1), grads))
    decay_(exp_avg_sq, beta2, ok).addcmul_(grads, grads, value=1.0 - beta2)
    bias1 = per_block(bias_correction(beta1, step, grads.dtype), grads)
    bias2 = per_block(bias_correction(beta2, step, grads.dtype), grads)
    denom = (exp_avg_sq.sqrt() / bias2.sqrt()).add_(eps)
    return exp_avg / bias1 / denom


CORRECTED = "adam_corrected"  # the block kind of a group with bias_correction other than "std" (not fused)


class AdamW(bc.MicrobatchCorrection, BlockEngine):
    r"""AdamW (Loshchilov & Hutter 2019) on precond's engine, a drop-in for ``torch.optim.AdamW``.

    .. math::
        W &\leftarrow W(1 - \text{lr}\cdot\text{wd}) \\
        M &\leftarrow \beta_1 M + (1-\beta_1) G,\quad V \leftarrow \beta_2 V + (1-\beta_2) G^{\odot 2} \\
        W &\leftarrow W - \text{lr}\,\frac{M/(1-\beta_1^t)}{\sqrt{V/(1-\beta_2^t)} + \epsilon}

    Args: ``lr`` (1e-3), ``betas`` ((0.9, 0.999)), ``eps`` (1e-8), ``weight_decay`` (1e-2), as torch's.
    The step is torch's fused AdamW kernel (``torch._fused_adamw_``) over each group's parameters; bf16/fp16
    parameters keep float32 state and run the same rule in stacked float32 arithmetic. Unlike torch's, a
    non-finite gradient never reaches the state: the group's step is skipped (as ``torch.amp.GradScaler``
    does) and the offending parameters are counted in ``preconditioner_stats()``.
    ``distributed`` (``None``, ``"ddp"`` or a process group) splits the work between processes under DDP;
    FSDP2 parameters need nothing (:mod:`precond.engine.distribute`).

    ``strict=True`` raises ``FloatingPointError`` naming the parameter and block when a gradient or an update is
    not finite, instead of skipping that block's step and counting it (``preconditioner_stats()``).

    ``bias_correction`` (per group; :mod:`precond.bias_correction`, Nayak et al. 2026) corrects the bias of
    ``m̂/(√v̂+ε)`` from microbatch statistics collected by :meth:`accumulate`: ``"std"`` (default) is the
    rule above; ``"cross_fit"`` feeds ``M`` the mean gradient of group A (the first ``cross_fit_fraction``
    of the microbatches) and ``V`` the mean of ``ĝ_j²`` over group B; ``"variance_corrected"`` replaces
    ``1/(√v̂+ε)`` by ``max(0, 1/d − Var(p̄)/d³)``, ``d = √v̂+ε``, where ``p_j = √((β₂V_{t-1} + (1-β₂)ĝ_j²)
    /(1-β₂ᵗ))`` is the denominator microbatch ``j`` alone would give and ``Var(p̄)`` their sample variance
    over the count; ``"full"`` does both (variance over group B). Extra memory per parameter, during the
    accumulation only: 3 tensors of its size (``cross_fit``, ``variance_corrected``), 5 (``full``).

    ``"loo"`` / ``"loo_jensen"`` are the authors' leave-one-out estimator (LOO, LOO+Jensen), with ``ĝ_r``
    microbatch ``r``'s gradient, ``ḡ`` their mean and ``ĝ_{-r} = (nḡ − ĝ_r)/(n − 1)``:

    .. math::
        d_r = \sqrt{\max(0, (\beta_2 V + (1-\beta_2)\hat g_{-r}^{\odot 2})/(1-\beta_2^t))} + \epsilon,\quad
        \hat m_r = \frac{\beta_1 M + (1-\beta_1)\hat g_r}{1-\beta_1^t},\quad
        u = \frac1n \sum_r \frac{\hat m_r}{d_r}

    and for ``"loo_jensen"`` ``u ← u − s²_d · \frac1n\sum_r \hat m_r/d_r^3`` where it keeps ``u``'s sign (0
    elsewhere), ``s²_d`` the sample variance of ``d_r`` over the folds; then ``W ← W(1 − lr·wd) − lr·u`` and
    ``M, V`` take ``ḡ`` as in plain AdamW. Extra memory: the ``n`` microbatch gradients until the step.
    """

    _group_rules = {**STEP_RULES, "betas": betas_rule, "eps": check_positive, **bc.ADAMW_RULES}

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, bias_correction: str = "std",
                 cross_fit_fraction: float = 0.5, distributed: Any = None, strict: bool = False) -> None:
        super().__init__(params, dict(lr=lr, betas=pair(betas), eps=eps, weight_decay=weight_decay,
                                      bias_correction=bias_correction, cross_fit_fraction=cross_fit_fraction),
                         distributed=distributed, strict=strict)

    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        return BlockLayout.build(tuple(param.shape), math.inf, "none", "identity")

    def _block_kind(self, layout, index, group):
        return ADAM if group["bias_correction"] == "std" else CORRECTED

    def _init_block(self, shape, kind, group, dtype, device):
        return adam_state(shape, dtype, device)

    def _directions(self, bucket, grads, ok, group):
        if bucket.kind == CORRECTED:
            return self._corrected_directions(bucket, grads, ok, group)
        return adam_directions(bucket, grads, ok, group["betas"], group["eps"])

    # ----------------------------------------------------------------- bias correction
    def _fold_microbatch(self, bucket: Bucket, grad: Tensor, index: int, n_a: int) -> None:
        mode, micro = bucket.group["bias_correction"], bucket.micro
        if mode in bc.LEAVE_ONE_OUT:  # each fold needs the mean of all the others: kept until the step
            micro.setdefault("grads", []).append(grad)
            return
        if bc.crosses(mode):
            name = "numer_sum" if index < n_a else "square_sum"
            value = grad if index < n_a else grad * grad
            bc.add_(micro, name, value)
        if bc.corrects_variance(mode) and index >= n_a:  # the variance group: B, or every microbatch
            beta2 = bucket.group["betas"][1]
            step = bucket.state["step"] + 1.0  # the coming step's t, per block
            bias2 = per_block(bias_correction(beta2, step, grad.dtype), grad)
            denominator = ((bucket.state["exp_avg_sq"] * beta2).addcmul_(grad, grad, value=1.0 - beta2) / bias2).sqrt_()
            bc.welford_(micro, "p", denominator, index + 1 - n_a)

    def _corrected_directions(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor:
        (beta1, beta2), mode = group["betas"], group["bias_correction"]
        if mode in bc.LEAVE_ONE_OUT:
            return self._leave_one_out_directions(bucket, grads, ok, group)
        micro = self._micro_state(bucket)
        n, n_a = micro["n"], micro["n_a"]
        numerator, square = ((micro["numer_sum"] / n_a, micro["square_sum"] / (n - n_a)) if bc.crosses(mode)
                             else (grads, grads * grads))
        variance = bc.variance_of_mean(micro, "p", n - n_a) if bc.corrects_variance(mode) else None
        step, exp_avg, exp_avg_sq = bucket.state["step"], bucket.state["exp_avg"], bucket.state["exp_avg_sq"]
        commit_(exp_avg, exp_avg.lerp(numerator, 1.0 - beta1), ok)
        commit_(exp_avg_sq, (exp_avg_sq * beta2).add_(square, alpha=1.0 - beta2), ok, require_finite=True)
        bias1 = per_block(bias_correction(beta1, step, grads.dtype), grads)
        bias2 = per_block(bias_correction(beta2, step, grads.dtype), grads)
        denominator = (exp_avg_sq / bias2).sqrt_().add_(group["eps"])
        return exp_avg / bias1 * bc.corrected_inverse(denominator, variance)

    def _leave_one_out_directions(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor:
        """The folds' mean step ``u`` (see the class docstring); ``grads`` is the step's mean gradient."""
        (beta1, beta2), eps = group["betas"], group["eps"]
        folds = self._micro_state(bucket)["grads"]
        n = len(folds)
        step, exp_avg, exp_avg_sq = bucket.state["step"], bucket.state["exp_avg"], bucket.state["exp_avg_sq"]
        bias1 = per_block(bias_correction(beta1, step, grads.dtype), grads)
        bias2 = per_block(bias_correction(beta2, step, grads.dtype), grads)
        jensen = group["bias_correction"] == "loo_jensen"
        first, third, spread = torch.zeros_like(grads), torch.zeros_like(grads), {}
        for r, fold in enumerate(folds):
            others = (n * grads - fold) / (n - 1)
            d = ((beta2 * exp_avg_sq + (1.0 - beta2) * others * others) / bias2).clamp_(min=0.0).sqrt_().add_(eps)
            m_hat = (beta1 * exp_avg + (1.0 - beta1) * fold) / bias1
            first.add_(m_hat / d, alpha=1.0 / n)
            if jensen:
                third.add_(m_hat / d.pow(3), alpha=1.0 / n)
                bc.welford_(spread, "d", d, r + 1)
        if jensen:
            corrected = first - (spread["d_m2"] / (n - 1)).clamp_(min=0.0) * third
            first = torch.where(corrected * first >= 0, corrected, torch.zeros_like(corrected))
        commit_(exp_avg, exp_avg.lerp(grads, 1.0 - beta1), ok)
        commit_(exp_avg_sq, (exp_avg_sq * beta2).addcmul_(grads, grads, value=1.0 - beta2), ok, require_finite=True)
        return first

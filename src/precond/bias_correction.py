r"""Microbatch statistics for bias-corrected preconditioning (Nayak et al. 2026, arXiv:2605.20756).

An adaptive step divides a gradient estimate by a preconditioner estimated from the *same* minibatch, and
``E[1/p̂] > 1/E[p̂]``: the step is biased. The step's batch, already split into microbatches for gradient
accumulation, gives two remedies, selected per param group by ``bias_correction``:

- ``"std"``: the plain optimizer (nothing is collected; :meth:`MicrobatchCorrection.accumulate` does nothing);
- ``"cross_fit"``: the numerator (the gradient fed to the first moment) is the mean gradient of the first
  ``n_A = max(1, ⌊cross_fit_fraction · n⌋)`` microbatches (group A); the preconditioner's statistic is the
  mean of the per-microbatch statistics of the other ``n_B`` (group B: for Adam ``mean_j ĝ_j²``);
- ``"variance_corrected"``: ``1/(p̄ + ε)`` is replaced by ``max(0, 1/(p̄+ε) − Var(p̄)/(p̄+ε)³)``, a second-order
  correction of the inverse, with ``Var(p̄)`` the sample variance over microbatches of the denominators
  ``p_j`` each microbatch alone would give, divided by their count (all ``n`` microbatches);
- ``"full"``: both, the variance taken over group B;
- AdamW only, the leave-one-out estimator behind the paper's pre-training headline ("LOO", the authors'
  ``LOOBCAdamW`` with their ``loo_hybrid`` collector): ``"loo"`` averages, over the ``n`` microbatches, the
  step whose numerator is microbatch ``r``'s gradient and whose denominator is built from the mean gradient of
  the other ``n − 1``; ``"loo_jensen"`` (LOO+Jensen) also subtracts each fold's ``Var(d)·m̂_r/d_r³``, ``Var(d)``
  the sample variance of the folds' denominators, zeroed where that flips the sign. The persistent moments
  take the step's mean gradient (square of the mean), as plain AdamW at the same batch. These keep every
  microbatch's gradient until the step (``n`` parameter-sized tensors).

``ĝ_j = n · g_j`` is microbatch ``j``'s gradient on the scale of the step's gradient (an accumulation loop
adds ``g_j`` = the gradient of ``loss_j / n``). Statistics are streamed (Welford), so memory does not grow
with ``n``. The loop stays an ordinary accumulation loop::

    opt = precond.AdamW(model.parameters(), lr=1e-3, bias_correction="full")
    for x, y in microbatches:                       # n of them
        (loss_fn(model(x), y) / n).backward()
        opt.accumulate(n)                           # after each microbatch's backward
    opt.step()                                      # p.grad holds the usual sum: clip it as usual
    opt.zero_grad()

``accumulate`` reads each microbatch's gradient from ``p.grad`` and zeroes it, and after the ``n``-th call
puts the usual accumulated sum back, so clipping and logging between the loop and ``step()`` see what
they always see.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .engine import Bucket, per_block
from .linalg import shifted_eigh, spectral_function
from .validation import Rule, check_choice, check_in, check_int

__all__ = ["MODES", "LEAVE_ONE_OUT", "RULES", "ADAMW_RULES", "SCALING", "MicrobatchCorrection", "split",
           "corrected_inverse", "corrected_inverse_roots", "welford_", "variance_of_mean"]

MODES = ("std", "cross_fit", "variance_corrected", "full")
LEAVE_ONE_OUT = ("loo", "loo_jensen")  # AdamW's


def _mode_rule(name: str, value: Any) -> None:
    check_choice(name, value, MODES)


def _adamw_mode_rule(name: str, value: Any) -> None:
    check_choice(name, value, MODES + LEAVE_ONE_OUT)


def _fraction_rule(name: str, value: Any) -> None:
    check_in(name, value, 0.0, 1.0, low_open=True, high_open=True)


# the group rules of an optimizer that offers bias correction (see precond.validation.check_group)
RULES: dict[str, Rule] = {"bias_correction": _mode_rule, "cross_fit_fraction": _fraction_rule}
ADAMW_RULES: dict[str, Rule] = {**RULES, "bias_correction": _adamw_mode_rule}


def crosses(mode: str) -> bool:
    return mode in ("cross_fit", "full")


def corrects_variance(mode: str) -> bool:
    return mode in ("variance_corrected", "full")


def split(mode: str, microbatches: int, fraction: float) -> int:
    """``n_A``, the microbatches of group A (0 when the mode does not cross-fit); raises ``ValueError`` naming
    ``microbatches`` when the mode cannot work with so few."""
    n_a = max(1, int(fraction * microbatches)) if crosses(mode) else 0
    n_var = microbatches - n_a  # the microbatches the variance is taken over (B, or all of them)
    if crosses(mode) and n_var < 1:
        raise ValueError(f"Invalid microbatches: {microbatches} (bias_correction={mode!r} with cross_fit_fraction="
                         f"{fraction} leaves group B empty)")
    if (corrects_variance(mode) or mode in LEAVE_ONE_OUT) and n_var < 2:
        raise ValueError(f"Invalid microbatches: {microbatches} (bias_correction={mode!r} needs at least 2 "
                         f"microbatches to take a variance over; it has {n_var})")
    return n_a


def corrected_inverse(denominator: Tensor, variance: Tensor | None) -> Tensor:
    """``1/d`` or, with the variance of the mean denominator, ``max(0, 1/d − Var/d³)``."""
    inverse = denominator.reciprocal()
    if variance is None:
        return inverse
    return (inverse - variance / denominator.pow(3)).clamp_(min=0.0)


def corrected_inverse_roots(A: Tensor, exponent: float, epsilon: float,
                            variance_along: Callable[[Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    r"""Shampoo's ``(A + εI)^{-p}`` with each eigenvalue's inverse root corrected to second order (delta
    method): ``d_k = max(0, λ_k^{-p} − ½p(p+1) λ_k^{-p-2} Var(λ̄_k))``; returns ``(roots, ok)``.

    ``variance_along(Q)`` gives ``Var(λ̄_k)`` ``[B, n]``, the variance of the mean eigenvalue along each new
    eigenvector (column of ``Q``), measured there from the microbatches, as the authors' code does. The
    eigenvalues follow :func:`~precond.linalg.inverse_roots`' shift rule.
    """
    L, Q, ok = shifted_eigh(A, epsilon)
    second_order = 0.5 * exponent * (exponent + 1.0) * L.pow(-exponent - 2.0) * variance_along(Q)
    d = (L.pow(-exponent) - second_order).clamp_(min=0.0)
    return spectral_function(Q, d, ok)


def add_(stats: dict[str, Tensor], name: str, value: Tensor) -> None:
    """``stats[name] += value`` (a new sum starts at ``value``)."""
    stats[name] = stats[name] + value if name in stats else value


def welford_(stats: dict[str, Tensor], prefix: str, value: Tensor, count: int) -> None:
    """Fold the ``count``-th (from 1) sample ``value`` into ``{prefix}_mean`` and ``{prefix}_m2``."""
    if count == 1:
        stats[f"{prefix}_mean"] = value.clone()
        stats[f"{prefix}_m2"] = torch.zeros_like(value)
        return
    mean = stats[f"{prefix}_mean"]
    delta = value - mean
    mean.add_(delta / count)
    stats[f"{prefix}_m2"].add_(delta * (value - mean))


def variance_of_mean(stats: dict[str, Tensor], prefix: str, count: int) -> Tensor:
    """``Var(mean) = sample variance / count = M2 / (count (count − 1))``."""
    return stats[f"{prefix}_m2"] / (count * (count - 1))


# How each accumulated statistic follows a rescaling of the microbatch gradients by ``c`` (its power of ``c``;
# ``outer{i}``: 2). AdamW's variance modes stream the variance of per-microbatch denominators ``p_j`` (``p_…``),
# which are not homogeneous in ``c``: those stay as measured on the unclipped microbatches.
SCALING = {"sum": 1, "numer_sum": 1, "square_sum": 2, "grads": 1, "variance_grads": 1, "s_mean": 2, "s_m2": 4}


class MicrobatchCorrection:
    """Mixin for a :class:`~precond.engine.BlockEngine` optimizer whose groups take ``bias_correction`` and
    ``cross_fit_fraction``. The optimizer supplies :meth:`_fold_microbatch` (what it keeps of one microbatch)
    and reads ``bucket.micro`` in its ``_directions``; ``bucket.micro`` is emptied after every step.
    """

    _micro_seen = 0
    _micro_total = 0

    def _fold_microbatch(self, bucket: Bucket, grad: Tensor, index: int, n_a: int) -> None:
        """Fold microbatch ``index``'s gradient ``grad`` (a stack in the state dtype, on the step's scale) into
        ``bucket.micro``; ``index < n_a`` means group A."""
        raise NotImplementedError

    def accumulate(self, microbatches: int) -> None:
        """Record the microbatch whose backward just ran; call after each of the step's ``microbatches``
        backward passes (the same count every call). Does nothing for groups with ``bias_correction="std"``."""
        check_int("microbatches", microbatches, 1)
        corrected = [g for g in self.param_groups if g["bias_correction"] != "std"]
        if not corrected:
            return
        if self._splits_work:
            raise NotImplementedError("bias_correction with distributed work splitting (distributed='ddp')")
        if self._micro_seen == 0:
            for g in corrected:
                split(g["bias_correction"], microbatches, g["cross_fit_fraction"])
            self._micro_total = microbatches
            self._micro_key = None
        elif microbatches != self._micro_total:
            raise ValueError(f"Invalid microbatches: {microbatches} (this step's first accumulate said "
                             f"{self._micro_total})")
        elif self._micro_seen >= microbatches:
            raise RuntimeError(f"accumulate({microbatches}) called more than {microbatches} times before step()")
        buckets = [b for b in self._plan() if b.group["bias_correction"] != "std"]
        if self._micro_key is None:
            self._micro_key = self._plan_key
        elif self._plan_key != self._micro_key:
            raise RuntimeError("the parameters with gradients changed between microbatches of one step")
        index, last = self._micro_seen, self._micro_seen == microbatches - 1
        for bucket in buckets:
            views = [m.view(m.grad().contiguous()) for m in bucket.members]
            raw = torch.stack(views).to(bucket.dtype)
            micro = bucket.micro
            micro["sum"] = raw if index == 0 else micro["sum"] + raw
            group = bucket.group
            n_a = split(group["bias_correction"], microbatches, group["cross_fit_fraction"])
            self._fold_microbatch(bucket, raw * microbatches, index, n_a)
        for bucket in buckets:  # the gradient slot is emptied for the next microbatch, or given the sum back
            for i, m in enumerate(bucket.members):
                if last:
                    m.view(m.grad()).copy_(bucket.micro["sum"][i])
                else:
                    m.grad().zero_()
        self._micro_seen += 1

    @torch.no_grad()
    def _step(self) -> None:  # after the closure, which may have accumulated the microbatches
        self._check_accumulated()
        try:
            self._follow_step_gradient()
            super()._step()
        finally:
            self._end_accumulation()

    def _follow_step_gradient(self) -> None:
        """Clipping: where ``p.grad`` was rescaled between the last :meth:`accumulate` and ``step()``
        (``clip_grad_norm_``, a loss-scale), each block's microbatch statistics are rescaled alike, as if every
        microbatch gradient had been multiplied by ``c = ⟨p.grad, Σ⟩ / ⟨Σ, Σ⟩`` (``Σ`` the accumulated sum;
        exact for a rescaling, the least-squares factor for anything else): gradients by ``c``, their squares
        and outer products by ``c²`` (:data:`SCALING`). An untouched ``p.grad`` gives ``c = 1`` exactly."""
        for bucket in self._buckets:
            micro = bucket.micro
            if bucket.group["bias_correction"] == "std" or "sum" not in micro:
                continue
            total = micro["sum"]
            now = torch.stack([m.view(m.grad().contiguous()) for m in bucket.members]).to(total.dtype)
            stored = total.to(bucket.members[0].param.dtype).to(total.dtype)  # Σ as p.grad holds it (bf16 rounds)
            dims = tuple(range(1, total.dim()))
            c = (now * total).sum(dims) / (stored * total).sum(dims).clamp(min=torch.finfo(total.dtype).tiny)
            for key, value in micro.items():
                power = 2 if key.startswith("outer") else SCALING.get(key)
                if power is None:
                    continue
                scale = c if power == 1 else c.pow(power)
                micro[key] = ([v * per_block(scale, v) for v in value] if isinstance(value, list)
                              else value * per_block(scale, value))

    def _check_accumulated(self) -> None:
        if any(g["bias_correction"] != "std" for g in self.param_groups) and (
                self._micro_seen == 0 or self._micro_seen != self._micro_total):
            raise RuntimeError(f"bias_correction needs accumulate(n) after each of the step's n microbatch "
                               f"backward passes; step() came after {self._micro_seen} of {self._micro_total}")

    def _end_accumulation(self) -> None:
        if self._micro_seen == 0 and self._micro_total == 0:
            return  # nothing was accumulated: no attribute is written (a compiled step traces whole)
        for bucket in self._buckets:
            bucket.micro.clear()
        self._micro_seen = self._micro_total = 0

    def _micro_state(self, bucket: Bucket) -> dict[str, Any]:
        """What a step reads: ``n`` and ``n_a`` of this step, and the bucket's accumulators."""
        group = bucket.group
        n = self._micro_total
        return {"n": n, "n_a": split(group["bias_correction"], n, group["cross_fit_fraction"]), **bucket.micro}

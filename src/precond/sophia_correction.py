"""Sophia's bias correction from microbatches (:mod:`precond.bias_correction`): what one microbatch leaves
in the statistics, and the curvature update from them. The estimators are the class docstring's
(:class:`precond.sophia.Sophia`)."""

from __future__ import annotations

import torch
from torch import Tensor

from . import bias_correction as bc
from .engine import Bucket, commit_

__all__ = ["SophiaCorrection"]


class SophiaCorrection(bc.MicrobatchCorrection):
    """The microbatch half of :class:`precond.sophia.Sophia`: ``cross_fit`` keeps group A's gradient sum
    (the step's numerator) and group B's squares (the curvature's); the variance modes a running variance
    of group B's squares."""

    def _fold_microbatch(self, bucket: Bucket, grad: Tensor, index: int, n_a: int) -> None:
        # Both passes fold the same statistics: the step reads group A's gradient sum, update_hessian the
        # squares of group B (the ``b`` of r_j = b·ĝ_j² is applied there, where B is known).
        mode, micro = bucket.group["bias_correction"], bucket.micro
        if bc.crosses(mode):
            name, value = ("numer_sum", grad) if index < n_a else ("square_sum", grad * grad)
            bc.add_(micro, name, value)
        if bc.corrects_variance(mode) and index >= n_a:
            bc.welford_(micro, "s", grad * grad, index + 1 - n_a)

    def _corrected_hessian_update(self, batch_size: int) -> None:
        """:meth:`update_hessian` for the groups with bias correction, from the accumulated microbatches."""
        self._check_accumulated()
        try:
            for bucket in self._plan():
                mode = bucket.group["bias_correction"]
                if mode == "std":
                    continue
                micro = self._micro_state(bucket)
                n, n_a, beta2, rho = micro["n"], micro["n_a"], bucket.group["betas"][1], bucket.group["rho"]
                labels = batch_size / n  # b, the labels of one microbatch
                estimate = (labels * micro["square_sum"] / (n - n_a) if bc.crosses(mode)
                            else batch_size * micro["sum"].to(bucket.dtype).square())
                ok = torch.isfinite(estimate).flatten(1).all(1)
                state = bucket.state
                commit_(state["hessian"], self.preconditioner.folded(state["hessian"], estimate, beta2), ok)
                if bc.corrects_variance(mode):  # Var(p̄) = (ρ(1-β₂)b)² Var(mean of ĝ_j²)
                    variance = bc.variance_of_mean(micro, "s", n - n_a) * (rho * (1.0 - beta2) * labels) ** 2
                    commit_(state["hessian_variance"], variance, ok, require_finite=True)
                state["hessian_updates"].add_(ok)
        finally:
            self._end_accumulation()

r"""SOAP's preconditioner: Adam's moments kept in the eigenbasis of Shampoo's factors, in the reference SOAP's order."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..engine import Bucket, bias_correction, commit_, ema_, per_block
from ..kronecker import factor_chunks, factor_matrices, init_factor_state, mode_product, update_factors_
from ..refresh import EigenbasisRefresh, policy_of, refresh_due

__all__ = ["EigenbasisAdam"]


class EigenbasisAdam:
    r"""Per block, factors ``L_i`` (EMA ``shampoo_beta``) with bases ``Q_i`` (descending), and Adam's moments of
    the projected gradient ``G' = G ×_1 Q_1ᵀ ⋯``. A step, as the reference orders it: :meth:`start` on the
    first (statistics and first bases only, no update); then :meth:`direction` (moments and
    ``[m / (√v + ε)] ×_1 Q_1 ⋯``) before :meth:`fold` (the factors, then the bases when due)."""

    def state(self, shape: tuple[int, ...], kind: tuple[bool, ...], dtype: torch.dtype,
              device: torch.device | str, packed: bool = False,
              basis_dtype: torch.dtype | None = None) -> dict[str, Tensor]:
        state = init_factor_state(shape, kind, dtype, device, matrix="basis", packed=packed, matrix_dtype=basis_dtype)
        state["exp_avg"] = torch.zeros(shape, dtype=dtype, device=device)
        state["exp_avg_sq"] = torch.zeros(shape, dtype=dtype, device=device)
        return state

    @staticmethod
    def _shampoo_beta(group: dict[str, Any]) -> float:
        return group["shampoo_beta"] if group["shampoo_beta"] >= 0 else group["betas"][1]

    def start(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> None:
        """The first gradient only builds the statistics: the projection never uses the gradient it projects
        (the reference's rule)."""
        shampoo_beta = self._shampoo_beta(group)
        update_factors_(bucket.state, grads, shampoo_beta, 1.0 - shampoo_beta, ok)
        self.first_bases(bucket, ok, group)

    def traces_refresh(self, group: dict[str, Any]) -> bool:
        """Whether :meth:`fold`'s refresh reads nothing on the host: the matmul-only ``refine`` (power-QR
        reads CholeskyQR's failures, eigh and the QR algorithm theirs)."""
        return group["refresh_method"] == "refine"

    @staticmethod
    def refreshes_at(calls: int, group: dict[str, Any]) -> bool:
        """Whether the bucket's step number ``calls`` refreshes the bases: every ``precondition_frequency``
        updates, counted from the first update (the first step only gathers statistics)."""
        frequency = group["precondition_frequency"]
        return refresh_due(calls - 1, frequency, frequency)

    def host_work_next(self, bucket: Bucket, group: dict[str, Any]) -> bool:
        """Whether the coming step reads a flag on the host: the first (eigh's first bases) or a refresh that
        is not traced; such a step runs eagerly, also when compiled (see ``BlockEngine.step``)."""
        calls = bucket.calls + 1  # the coming step's count, as it will see it
        return calls == 1 or (self.refreshes_at(calls, group) and not self.traces_refresh(group))

    @staticmethod
    def first_bases(bucket: Bucket, ok: Tensor, group: dict[str, Any]) -> None:
        """Every factor's first basis, by eigh (descending; ``1e-30·I`` added, as the reference does)."""
        policy, state = policy_of(group, descending=True), bucket.state
        for i, use in enumerate(bucket.kind):
            if not use:
                continue
            factors, basis, stats = state[f"factor{i}"], state[f"basis{i}"], state[f"stats{i}"]
            for part, factor in factor_chunks(factors, basis.shape[-1]):
                eye = torch.eye(factor.shape[-1], dtype=factor.dtype, device=factor.device)
                basis[part] = policy.initial(factor + 1e-30 * eye, basis[part].to(factor.dtype), stats[part], ok[part])

    def direction(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor:
        beta1, beta2 = group["betas"]
        state, bases = bucket.state, factor_matrices(bucket, "basis")
        projected = mode_product(grads, bases)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        ema_(exp_avg, projected, beta1, 1.0 - beta1, ok)  # a refused block's projection is zero
        ema_(exp_avg_sq, projected.square(), beta2, 1.0 - beta2, ok)
        direction = mode_product(exp_avg / (exp_avg_sq.sqrt() + group["eps"]), bases, transpose=True)
        if group["normalize_grads"]:
            rms = direction.square().flatten(1).mean(1).sqrt()
            direction = direction / per_block(1e-30 + rms, direction)
        if group["correct_bias"]:
            t = state["step"] - 1  # the step count includes the first, statistics-only step
            scale = bias_correction(beta2, t, direction.dtype).sqrt() / bias_correction(beta1, t, direction.dtype)
            direction = direction * per_block(scale, direction)
        return direction

    def fold(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> None:
        """The gradient into the factors, then new bases every ``precondition_frequency`` updates."""
        shampoo_beta = self._shampoo_beta(group)
        update_factors_(bucket.state, grads, shampoo_beta, 1.0 - shampoo_beta, ok)
        if self.refreshes_at(bucket.calls, group):
            self.refresh(bucket, policy_of(group, descending=True), ok)

    @staticmethod
    def refresh(bucket: Bucket, policy: EigenbasisRefresh, ok: Tensor) -> None:
        """New bases for every factor; the first moment follows into the new basis, the second moment's
        entries are permuted with the columns (the reference's approximation)."""
        state = bucket.state
        moment = mode_product(state["exp_avg"], factor_matrices(bucket, "basis"), transpose=True)
        changed = policy.refresh_bucket_(state, bucket.kind, ok, state["exp_avg_sq"])
        commit_(state["exp_avg"], mode_product(moment, factor_matrices(bucket, "basis")), changed)

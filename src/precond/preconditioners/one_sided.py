r"""ASGO's rule: one full-matrix preconditioner on one side of each weight matrix."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

from ..engine import Bucket, commit_, ema_
from ..kronecker import init_factor_state
from ..linalg import inverse_roots, inverse_sqrt_newton_schulz
from ..refresh import count_refreshes_, refresh_due
from .base import MatrixPreconditioner

__all__ = ["OneSidedRoot"]


class OneSidedRoot(MatrixPreconditioner):
    r"""``V ← β₂V + (1-β₂)GGᵀ`` (``GᵀG`` on the right side), ``M ← β₁M + (1-β₁)G``, the direction
    ``(V + εI)^{-1/2} M`` (or ``M (V + εI)^{-1/2}``), the root recomputed every ``precondition_frequency``
    steps (the first step has one) by ``eigh`` or the coupled Newton–Schulz iteration; a failed root keeps
    the last good one and is counted. The side is the group's ``side``; ``"auto"`` takes the smaller."""

    def kind(self, shape: tuple[int, ...], group: dict[str, Any]) -> str:
        if group["side"] == "auto":
            return "left" if shape[0] <= shape[1] else "right"
        # "left" is the output side; a matrix stored (fan_in, fan_out) (Hugging Face's Conv1D) has it on the right
        return "left" if (group["side"] == "left") != group.get("transposed", False) else "right"

    def state(self, shape: tuple[int, ...], kind: Hashable, group: dict[str, Any], dtype: torch.dtype,
              device: torch.device | str) -> dict[str, Tensor]:
        n = shape[0] if kind == "left" else shape[1]
        state = init_factor_state((n,), (True,), dtype, device, matrix="root")
        state["momentum"] = torch.zeros(shape, dtype=dtype, device=device)
        return state

    @staticmethod
    def _root_due(calls: int, group: dict[str, Any]) -> bool:
        """Whether the bucket's step number ``calls`` computes a root (the first step has one)."""
        return refresh_due(calls - 1, group["precondition_frequency"], 0)

    def host_work_next(self, bucket: Bucket, group: dict[str, Any]) -> bool:
        # eigh reads its failures on the host; the coming step counts calls + 1
        return group["root_method"] == "eigh" and self._root_due(bucket.calls + 1, group)

    def direction(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor:
        beta1, beta2 = group["betas"]
        left = bucket.kind == "left"
        state = bucket.state
        V, root, momentum = state["factor0"], state["root0"], state["momentum"]
        outer = grads @ grads.mT if left else grads.mT @ grads
        ema_(V, outer, beta2, 1.0 if beta2 == 1.0 else 1.0 - beta2, ok)  # refused blocks' gradients are zero
        ema_(momentum, grads, beta1, 1.0 - beta1, ok)
        if self._root_due(bucket.calls, group):
            if group["root_method"] == "eigh":
                new, good = inverse_roots(V, 0.5, group["epsilon"])
            else:
                new = inverse_sqrt_newton_schulz(V, group["epsilon"], group["ns_steps"])
                good = torch.isfinite(new).flatten(1).all(1)
            commit_(root, new, ok & good)  # a failed root keeps the last good one
            count_refreshes_(state["stats0"], ok, good)
        return root @ momentum if left else momentum @ root

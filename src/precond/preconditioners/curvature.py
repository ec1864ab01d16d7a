r"""Sophia's preconditioner: a per-coordinate curvature estimate ``H``, and the clipped step ``M / max(ρH, ε)``."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import bias_correction as bc
from ..engine import Bucket, commit_

__all__ = ["DiagonalCurvature"]


class DiagonalCurvature:
    r"""``M ← β₁M + (1-β₁)G`` every step; ``H ← β₂H + (1-β₂)ĥ`` when a curvature estimate ``ĥ`` is folded in
    (:meth:`fold_`); the direction ``clip(M / max(ρH, ε), ±1)``, with ``1/max(ρH, ε)`` replaced by the
    variance-corrected inverse under a variance-correcting ``bias_correction``."""

    def state(self, shape: tuple[int, ...], group: dict[str, Any], dtype: torch.dtype,
              device: torch.device | str) -> dict[str, Tensor]:
        state = {"exp_avg": torch.zeros(shape, dtype=dtype, device=device),
                 "hessian": torch.zeros(shape, dtype=dtype, device=device),
                 "hessian_updates": torch.zeros((), dtype=torch.int64, device=device)}
        if bc.corrects_variance(group["bias_correction"]):
            state["hessian_variance"] = torch.zeros(shape, dtype=dtype, device=device)
        return state

    def direction(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor:
        beta1 = group["betas"][0]
        exp_avg, hessian = bucket.state["exp_avg"], bucket.state["hessian"]
        commit_(exp_avg, torch.add(exp_avg * beta1, grads, alpha=1.0 - beta1), ok)
        denom = torch.clamp(group["rho"] * hessian, min=group["eps"])
        if bc.corrects_variance(group["bias_correction"]):
            return torch.clamp(exp_avg * bc.corrected_inverse(denom, bucket.state["hessian_variance"]), -1.0, 1.0)
        return torch.clamp(exp_avg / denom, -1.0, 1.0)

    @staticmethod
    def estimates(params: list[Tensor], estimator: str, batch_size: int | None) -> list[Tensor]:
        """One curvature estimate ``ĥ`` per parameter from its current gradient: ``B·ĝ²`` (``"gnb"``: the
        gradients of a loss on sampled labels, ``batch_size = B``) or ``u ⊙ (∇²L u)`` (``"hutchinson"``: the
        gradients carry a graph; ``u`` Rademacher)."""
        if estimator == "gnb":
            return [batch_size * p.grad.detach() * p.grad.detach() for p in params]
        if any(p.grad.grad_fn is None for p in params):
            raise RuntimeError("Sophia-H needs gradients with a graph: call loss.backward(create_graph=True)")
        probes = [torch.randint_like(p, 2) * 2 - 1 for p in params]
        hvps = torch.autograd.grad([p.grad for p in params], params, grad_outputs=probes)
        return [u * hv for u, hv in zip(probes, hvps)]

    @staticmethod
    def folded(hessian: Tensor, estimate: Tensor, beta2: float) -> Tensor:
        """``β₂H + (1-β₂)ĥ``, for the caller to commit where ``ĥ`` is finite."""
        return torch.add(hessian * beta2, estimate, alpha=1.0 - beta2)

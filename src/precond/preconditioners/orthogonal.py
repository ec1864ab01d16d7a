r"""Muon's rule: momentum orthogonalised by a Newton–Schulz iteration."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

from ..engine import Bucket, per_block
from ..newton_schulz import gram_newton_schulz, gram_newton_schulz_flops, newton_schulz, newton_schulz_flops
from .base import MatrixPreconditioner

__all__ = ["NS_DTYPES", "NS_ALGORITHMS", "Orthogonalized", "uses_gram"]

NS_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32,
             "float64": torch.float64}
NS_ALGORITHMS = ("standard_newton_schulz", "gram_newton_schulz")


def uses_gram(rows: int, cols: int, group: dict[str, Any]) -> bool:
    """Whether a ``rows × cols`` matrix of this group runs the Gram iteration: asked for, and fewer FLOPs
    than the plain one (not for square or nearly square matrices, where the Gram products cost more)."""
    if group.get("ns_algorithm", "standard_newton_schulz") != "gram_newton_schulz":
        return False
    steps, restarts = group["ns_steps"], tuple(group["gram_newton_schulz_restart_iterations"])
    return gram_newton_schulz_flops(rows, cols, steps, restarts) < newton_schulz_flops(rows, cols, steps)


class Orthogonalized(MatrixPreconditioner):
    r"""``B ← μB + (1-μ)G``; ``U = (1-μ)G + μB`` (Nesterov) or ``B``; the direction
    ``NS^{(n)}_{a,b,c}(U / max(‖U‖_F, ε)) ≈ polar(U)``, in the group's ``ns_dtype`` (as torch.optim.Muon
    adds it; the shape's rate factor is the optimizer's), by the group's ``ns_algorithm``: the plain
    iteration, or the same one carried by the Gram matrix where that costs fewer FLOPs (:func:`uses_gram`)."""

    def state(self, shape: tuple[int, ...], kind: Hashable, group: dict[str, Any], dtype: torch.dtype,
              device: torch.device | str) -> dict[str, Tensor]:
        return {"momentum_buffer": torch.zeros(shape, dtype=dtype, device=device)}

    def direction(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor:
        momentum = group["momentum"]
        buf = bucket.state["momentum_buffer"]
        # A weight of 0 leaves a block with a non-finite gradient exactly as it was.
        buf.lerp_(grads, per_block(ok.to(buf.dtype) * (1.0 - momentum), buf))
        dtype = NS_DTYPES[group["ns_dtype"]]
        if group["nesterov"]:  # written straight in the iteration's dtype: one pass instead of two
            update = torch.lerp(grads, buf, momentum, out=torch.empty_like(grads, dtype=dtype))
        else:
            update = buf
        if uses_gram(*update.shape[-2:], group):
            return gram_newton_schulz(update, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype,
                                      keep_dtype=True,
                                      restart_iterations=tuple(group["gram_newton_schulz_restart_iterations"]))
        return newton_schulz(update, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype,
                             keep_dtype=True)

r"""Muon's rule: momentum orthogonalised by a Newton–Schulz iteration."""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any

import torch
from torch import Tensor

from ..engine import Bucket, per_block
from ..linalg import newton_schulz
from .base import MatrixPreconditioner

__all__ = ["NS_DTYPES", "Orthogonalized"]

NS_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64}


class Orthogonalized(MatrixPreconditioner):
    r"""``B ← μB + (1-μ)G``; ``U = (1-μ)G + μB`` (Nesterov) or ``B``; the direction
    ``NS^{(n)}_{a,b,c}(U / max(‖U‖_F, ε)) ≈ polar(U)``, in the group's ``ns_dtype`` (as torch.optim.Muon
    adds it; the shape's rate factor is the optimizer's)."""

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
        return newton_schulz(update, group["ns_steps"], group["ns_coefficients"], group["eps"], dtype,
                             keep_dtype=True)

"""Small helpers for arithmetic on bucket stacks: tensors whose leading dim indexes blocks.

Every state update in a bucket is guarded by a per-block mask ``ok`` (the block's gradient was finite).
A masked update leaves the state of a block with ``ok = False`` bit-for-bit unchanged, without a host
sync: the new value is computed for every block and committed with ``torch.where``. Squared statistics (a
Kronecker factor, a second moment) are committed only where the new value is finite: a finite gradient
past ~1e19 overflows them in float32, and an Inf there would stay for good.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["per_block", "commit_", "bias_correction", "finite_mask", "finite_rows"]


def per_block(values: Tensor, like: Tensor) -> Tensor:
    """``values`` of shape ``[B]`` viewed as ``[B, 1, …, 1]`` to broadcast against ``like`` (``[B, …]``)."""
    return values.view(values.shape + (1,) * (like.dim() - values.dim()))


def commit_(target: Tensor, new: Tensor, ok: Tensor, require_finite: bool = False) -> None:
    """``target[b] ← new[b]`` for the blocks with ``ok[b]``; the others keep their value exactly.

    ``require_finite``: a block whose new value is not finite keeps its value too. For squared statistics
    (Kronecker factors, second moments), which a finite gradient past ~1e19 overflows in float32; elsewhere
    the check is left out, as it costs a pass over the tensor.
    """
    if require_finite:
        ok = ok & (torch.isfinite(new).flatten(1).all(1) if new.dim() > 1 else torch.isfinite(new))
    torch.where(per_block(ok, target), new, target, out=target)


def bias_correction(beta: float, step: Tensor, dtype: torch.dtype) -> Tensor:
    """``1 - beta**t`` per block (``step`` holds ``t``, shape ``[B]``), in ``dtype``.

    Computed on the device, so that a step never waits for the host; divide a stack ``x`` by
    ``per_block(result, x)``.
    """
    return 1.0 - torch.pow(beta, step.to(dtype))


def _order(device: torch.device) -> float:
    # The inf-norm (max |x|, NaN-propagating) is exact; on a CPU its kernel is slow and the 1-norm is used:
    # NaN and ±inf propagate into it, and a finite tensor only reads as non-finite if its absolute values
    # sum past the dtype's largest number (~3e38 for float32).
    return float("inf") if device.type == "cuda" else 1.0


def finite_mask(tensors: list[Tensor]) -> Tensor:
    """``[B]`` bools: whether every entry of ``tensors[b]`` is finite, reading each tensor once (one
    multi-tensor norm; see :func:`finite_rows` for a stack, which costs the host less)."""
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, _order(tensors[0].device))))


def finite_rows(stack: Tensor) -> Tensor:
    """``[B]`` bools: whether every entry of ``stack[b]`` is finite, by one reduction over the stack."""
    return torch.isfinite(torch.linalg.vector_norm(stack.flatten(1), _order(stack.device), dim=1))

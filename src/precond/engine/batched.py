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

__all__ = ["per_block", "commit_", "bias_correction", "finite_mask"]


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


def finite_mask(tensors: list[Tensor]) -> Tensor:
    """``[B]`` bools: whether every entry of ``tensors[b]`` is finite, reading each tensor once.

    On a GPU by the multi-tensor inf-norm (max |x|, NaN-propagating), exact. On a CPU that kernel is slow
    and the 1-norm is used: NaN and ±inf propagate into it, and a finite tensor only reads as non-finite if
    its absolute values sum past the dtype's largest number (~3e38 for float32).
    """
    order = float("inf") if tensors[0].device.type == "cuda" else 1.0
    return torch.isfinite(torch.stack(torch._foreach_norm(tensors, order)))

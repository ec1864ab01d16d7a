"""Small helpers for arithmetic on bucket stacks: tensors whose leading dim indexes blocks.

Every state update in a bucket is guarded by a per-block mask ``ok`` (the block's gradient was usable). A
masked update leaves the state of a block with ``ok = False`` bit-for-bit unchanged, without a host sync:
either in place, with that block's decay undone (:func:`ema_`, for statistics of the engine's gradients,
whose refused blocks are zero), or by computing the new value for every block and selecting it with
``torch.where`` (:func:`commit_`). The engine refuses a gradient that is not finite or whose norm passes
:func:`gradient_bound`: its squares would overflow a float32 statistic, and an Inf there would stay for good.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["per_block", "commit_", "decay_", "ema_", "refusal_factors", "bias_correction", "gradient_bound",
           "gradient_mask", "gradient_rows", "UPDATE_BOUND"]


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
    if new.dtype != target.dtype:  # a matrix kept narrower (``preconditioner_dtype``) takes the value rounded
        new = new.to(target.dtype)
    torch.where(per_block(ok, target), new, target, out=target)


def bias_correction(beta: float, step: Tensor, dtype: torch.dtype) -> Tensor:
    """``1 - beta**t`` per block (``step`` holds ``t``, shape ``[B]``), in ``dtype``.

    Computed on the device, so that a step never waits for the host; divide a stack ``x`` by
    ``per_block(result, x)``.
    """
    return 1.0 - torch.pow(beta, step.to(dtype))


def gradient_bound(dtype: torch.dtype) -> float:
    """The largest gradient norm a block may have: 1% of the square root of ``dtype``'s largest number
    (1.8e17 in float32). Its squares, the Kronecker factors and second moments built from them, and their
    products in a refresh, then stay finite."""
    return math.sqrt(torch.finfo(dtype).max) * 1e-2


# An update whose RMS exceeds this × max(RMS(W), 1) is not applied (BlockEngine._apply): no step of any rate a
# model survives comes near it.
UPDATE_BOUND = 1e4


def gradient_mask(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    """``[B]`` bools: whether ``tensors[b]`` is a gradient the engine takes into statistics of ``dtype`` (the
    state's): finite, with its norm, computed in ``dtype``, within :func:`gradient_bound`. One multi-tensor norm
    (see :func:`gradient_rows` for a stack, which costs the host less); NaN and ±inf propagate into the norm
    and fail the comparison. A float16 gradient is measured in float32: its own range ends at 65504."""
    stacked_norms = _STACKED_NORMS_OP if torch.compiler.is_compiling() else _stacked_norms
    return stacked_norms(tensors, dtype) <= gradient_bound(dtype)


# The multi-tensor norm, stacked, as one operator that a compiled step calls as it is: inductor would write a
# reduction kernel per tensor and a one-element copy per norm (about 100 launches for GPT-2 small's 50 tensors).
# Registered with torch.library directly: torch.library.custom_op's wrapper costs ~0.1 ms of host time a call.
_LIBRARY = torch.library.Library("precond", "FRAGMENT")
_LIBRARY.define("stacked_norms(Tensor[] tensors, ScalarType dtype) -> Tensor")


def _stacked_norms(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors, 2, dtype=dtype))


_LIBRARY.impl("stacked_norms", _stacked_norms, "CompositeExplicitAutograd")


@torch.library.register_fake("precond::stacked_norms")
def _(tensors: list[Tensor], dtype: torch.dtype) -> Tensor:
    return tensors[0].new_empty(len(tensors), dtype=dtype)


_STACKED_NORMS_OP = torch.ops.precond.stacked_norms.default


def gradient_rows(stack: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B]`` bools: :func:`gradient_mask` for the blocks of a stack, by one reduction over it."""
    return torch.linalg.vector_norm(stack.flatten(1), dim=1, dtype=dtype) <= gradient_bound(dtype)


def refusal_factors(value: float, ok: Tensor, dtype: torch.dtype) -> Tensor:
    """``[B]``: ``value`` for the blocks with ``ok``, exactly 1 for the others; a per-block decay (of a
    statistic, of the weights) that leaves a refused block as it was."""
    return torch.ones(ok.shape, dtype=dtype, device=ok.device).masked_fill_(ok, value)


def decay_(target: Tensor, beta: float, ok: Tensor) -> Tensor:
    """``target ← beta·target`` in place for the blocks with ``ok``; the others are multiplied by exactly 1.
    The first half of an average whose increment is zero on refused blocks (:func:`ema_`, or added by a
    GEMM or ``addcmul_``). Returns ``target``."""
    if beta != 1.0:
        target.mul_(per_block(refusal_factors(beta, ok, target.dtype), target))
    return target


def ema_(target: Tensor, increment: Tensor, beta: float, weight: float, ok: Tensor) -> None:
    """``target ← beta·target + weight·increment`` in place, for the blocks with ``ok``; the others keep
    their value exactly.

    ``increment`` must be zero on the blocks without ``ok``: it is computed from the engine's gradients (a
    projection, a square, an outer product), whose refused blocks the engine zeroes. Such a block then only
    needs its decay undone: it is multiplied by 1 instead of ``beta``. Two passes over ``target``, where
    computing the new value and selecting it with :func:`commit_` costs five. Nothing overflows: the engine
    refuses gradients past :func:`gradient_bound`, so a decaying average (``beta < 1``) of their squares
    stays below the bound's square; a running sum (``beta = 1``) would need 10⁴ steps at the bound.
    The arithmetic is ``commit_(target, torch.add(target * beta, increment, alpha=weight), ok)``'s, bit for bit.
    """
    decay_(target, beta, ok).add_(increment, alpha=weight)

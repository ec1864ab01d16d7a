"""How a parameter is cut into the blocks that Kronecker preconditioners see.

A parameter is first viewed with some adjacent dims merged (conv weights ``[out, in, kh, kw]`` usually
become ``[out, in·kh·kw]``), then every dim longer than ``max_dim`` is either split into chunks of at most
``max_dim`` (Distributed Shampoo's blocking) or kept whole and left un-preconditioned (the reference
SOAP's behaviour). Blocks are views into the parameter, so updating a block updates the parameter.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass

from torch import Tensor

__all__ = ["merge_dims", "BlockLayout", "MERGE_RULES", "LARGE_DIM_RULES"]

MERGE_RULES = ("none", "leading", "trailing", "matrix")
LARGE_DIM_RULES = ("split", "identity")


def merge_dims(shape: tuple[int, ...], max_dim: int | float, rule: str) -> tuple[int, ...]:
    """Merge adjacent dims while their product stays ``<= max_dim``.

    ``rule``:
      - ``"none"``: keep the shape (a 0-d tensor becomes ``(1,)``).
      - ``"leading"``: scan from the first dim (the reference SOAP's ``merge_dims``).
      - ``"matrix"``: ``(shape[0], prod(shape[1:]))`` for tensors of 3 or more dims.
      - ``"trailing"``: drop dims of size 1, then scan from the last dim (Distributed Shampoo's
        ``merge_small_dims``), e.g. ``(32, 3, 64, 64)`` with 8192 gives ``(96, 4096)``.
    """
    shape = tuple(int(s) for s in shape) or (1,)
    if rule == "none" or 0 in shape:
        return shape
    if rule == "matrix":  # (fan_out, fan_in · kernel…): how Muon and ASGO see a weight
        return shape if len(shape) <= 2 else (shape[0], math.prod(shape[1:]))
    if rule == "leading":
        merged: list[int] = []
        current = 1
        for size in shape:
            if current * size > max_dim:
                if current > 1:
                    merged.append(current)
                    current = size
                else:
                    merged.append(size)
                    current = 1
            else:
                current *= size
        if current > 1 or not merged:
            merged.append(current)
        return tuple(merged)
    if rule == "trailing":
        dims = [s for s in reversed(shape) if s != 1] or [1]
        merged = [dims[0]]
        for size in dims[1:]:
            if merged[-1] * size <= max_dim:
                merged[-1] *= size
            else:
                merged.append(size)
        return tuple(reversed(merged))
    raise ValueError(f"merge rule must be one of {MERGE_RULES}, got {rule!r}")


@dataclass(frozen=True)
class BlockLayout:
    """The blocks of one parameter: its merged view and, per block, slices and preconditioned dims.

    ``max_factor_ratio`` is the memory guard: a dim of length ``n`` in a block of ``m`` elements gets a
    Kronecker factor only if ``n² <= max_factor_ratio · m`` (so each factor holds at most that many times
    the block's elements), and dims are not merged when the merged dim would break that bound (a 32×32
    weight stays 32×32 instead of one 1024×1024 factor). ``inf`` turns the guard off.
    """

    param_shape: tuple[int, ...]
    view_shape: tuple[int, ...]
    slices: tuple[tuple[slice, ...], ...]
    block_shapes: tuple[tuple[int, ...], ...]
    max_dim: int | float
    max_factor_ratio: float = math.inf
    merge_undone: bool = False  # the guard kept the dims apart that the merge rule would have joined

    @classmethod
    @functools.lru_cache(maxsize=4096)  # a pure function of hashable arguments, asked for at every step
    def build(cls, shape: tuple[int, ...], max_dim: int | float, merge: str, large_dims: str,
              max_factor_ratio: float = math.inf) -> "BlockLayout":
        if large_dims not in LARGE_DIM_RULES:
            raise ValueError(f"large-dim rule must be one of {LARGE_DIM_RULES}, got {large_dims!r}")
        # A merged dim n must keep n² <= max_factor_ratio · numel: merging stops at √(ratio · numel).
        bound = max_dim if math.isinf(max_factor_ratio) else min(
            max_dim, math.isqrt(int(max_factor_ratio * math.prod(shape))))
        view = merge_dims(tuple(shape), bound, merge)
        merge_undone = view != merge_dims(tuple(shape), max_dim, merge)
        if large_dims == "split" and not math.isinf(max_dim):
            step = int(max_dim)
            per_dim = [[slice(i, min(i + step, n)) for i in range(0, n, step)] or [slice(0, 0)] for n in view]
        else:
            per_dim = [[slice(0, n)] for n in view]
        slices = tuple(itertools.product(*per_dim))
        block_shapes = tuple(tuple(s.stop - s.start for s in sl) for sl in slices)
        return cls(tuple(shape), view, slices, block_shapes, max_dim, max_factor_ratio, merge_undone)

    def blocks(self, tensor: Tensor) -> list[Tensor]:
        """Views of ``tensor`` (which must be contiguous and of ``param_shape``), one per block."""
        view = tensor.view(self.view_shape)
        return [view[sl] for sl in self.slices]

    def preconditioned_dims(self, block_index: int, precondition_1d: bool) -> tuple[bool, ...]:
        """Which dims of a block get a Kronecker factor: those of length ``<= max_dim`` whose factor keeps
        within ``max_factor_ratio``. A parameter that is 1-D (or 0-D) to begin with gets none unless
        ``precondition_1d``; a matrix merged into one dim does."""
        shape = self.block_shapes[block_index]
        if len(self.param_shape) <= 1 and not precondition_1d:
            return tuple(False for _ in shape)
        limit = self.max_factor_ratio * math.prod(shape)
        return tuple(n <= self.max_dim and n * n <= limit for n in shape)

    def guard_note(self, precondition_1d: bool) -> str | None:
        """What the memory guard changed in this layout, in words (``None`` when nothing)."""
        if self.merge_undone:
            return f"its dims are merged only as far as {self.view_shape} (further, a factor would exceed the ratio)"
        lost = sorted({n for b, shape in enumerate(self.block_shapes)
                       for n, use in zip(shape, self.preconditioned_dims(b, precondition_1d))
                       if not use and n <= self.max_dim and (len(self.param_shape) > 1 or precondition_1d)})
        if lost:
            return f"dims of length {lost} get no factor (each would hold more than the ratio times its block)"
        return None

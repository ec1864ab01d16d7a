"""Planning a step: every block of every parameter, bucketed so that the arithmetic runs batched.

A *bucket* holds blocks of one param group that share (block shape, state dtype, device, kind, step
count); its state lives in stacked tensors (leading dim = block), and each parameter's entries in
``optimizer.state`` are views into those stacks. So a step is a few batched calls per bucket, while
``state_dict()`` still sees one flat dict of tensors per parameter, as the ``torch.optim`` ecosystem
(``torch.save``, ``torch.distributed.checkpoint``) expects.

Per-parameter keys are the optimizer's own names (``"exp_avg"``, ``"factor0"``, …) for a parameter of
one block, and ``"block{b}.{name}"`` for a parameter cut into several blocks. Every block also has a
``step`` (float32, as ``torch.optim`` keeps it) and a ``nonfinite`` counter (int64).

The kind :data:`ADAM` is special: a bucket of Adam blocks whose parameters have the state's dtype is run
by torch's fused AdamW kernel over tensor lists, so it needs no common shape and no stacks.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..blocks import BlockLayout

__all__ = ["ADAM", "Member", "Bucket", "state_dtype", "block_prefix", "engine_entries"]

ADAM = "adam"


def state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state is float32 unless the parameter is float64 (then float64)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def block_prefix(block: int, blocks: int) -> str:
    return "" if blocks == 1 else f"block{block}."


@dataclass(eq=False)
class Member:
    """One block of one parameter."""

    param: Tensor
    layout: BlockLayout
    block: int
    prefix: str

    def view(self, tensor: Tensor) -> Tensor:
        """This block of ``tensor`` (the parameter, its gradient or a contiguous copy of either)."""
        if len(self.layout.slices) == 1:
            return tensor.view(self.layout.block_shapes[0])
        return tensor.view(self.layout.view_shape)[self.layout.slices[self.block]]


@dataclass(eq=False)
class Bucket:
    """Blocks that step together; see the module docstring."""

    group: dict[str, Any]
    group_index: int
    kind: Hashable
    shape: tuple[int, ...] | None  # None: a fused Adam bucket (tensor lists of any shapes)
    dtype: torch.dtype
    device: torch.device
    members: list[Member]
    calls: int  # steps taken so far (a host-side count, for schedules; per-block counts are in "step")
    state: dict[str, Any] = field(default_factory=dict)  # name -> stack [B, ...] (or list, fused Adam)

    @functools.cached_property
    def params(self) -> list[Tensor]:
        return [m.param for m in self.members]

    @functools.cached_property
    def contiguous(self) -> bool:
        return all(m.param.is_contiguous() for m in self.members)

    @property
    def fused(self) -> bool:
        return self.shape is None

    def __len__(self) -> int:
        return len(self.members)


def build_buckets(optimizer: Any, groups: list[dict[str, Any]], with_grad: list[list[Tensor]]) -> list[Bucket]:
    """Buckets for the parameters in ``with_grad`` (per group), their state stacked from
    ``optimizer.state`` where it exists and fresh (``optimizer._init_block``) where it does not."""
    keyed: dict[tuple, list[Member]] = {}
    for gi, (group, params) in enumerate(zip(groups, with_grad)):
        for p in params:
            layout = optimizer._layout(p, group)
            dtype = state_dtype(p)
            state = optimizer.state[p]
            n = len(layout.block_shapes)
            for b, shape in enumerate(layout.block_shapes):
                prefix = block_prefix(b, n)
                kind = optimizer._block_kind(layout, b, group)
                step = state.get(prefix + "step")
                calls = int(step.item()) if step is not None else 0  # a host read at planning time only
                fused = kind == ADAM and p.dtype == dtype
                key = (gi, None if fused else tuple(shape), dtype, p.device, kind, calls)
                keyed.setdefault(key, []).append(Member(p, layout, b, prefix))
    buckets = []
    for (gi, shape, dtype, device, kind, calls), members in keyed.items():
        bucket = Bucket(groups[gi], gi, kind, shape, dtype, device, members, calls)
        _attach_state(optimizer, bucket)
        buckets.append(bucket)
    return buckets


def fresh_block_state(optimizer: Any, shape: tuple[int, ...], kind: Hashable, group: dict[str, Any],
                      dtype: torch.dtype, device: torch.device | str) -> dict[str, Tensor]:
    """The state of one new block, engine entries included (``device="meta"`` for shape checks)."""
    return {**optimizer._init_block(tuple(shape), kind, group, dtype, device), **engine_entries(device)}


def engine_entries(device: torch.device | str) -> dict[str, Tensor]:
    """What the engine keeps for every block: its step count (float32, as torch.optim) and non-finite count."""
    return {"step": torch.zeros((), dtype=torch.float32, device=device),
            "nonfinite": torch.zeros((), dtype=torch.int64, device=device)}


def _attach_state(optimizer: Any, bucket: Bucket) -> None:
    if bucket.fused:
        # Moments stay per-parameter tensors (the kernel takes lists of any shapes); the step and
        # non-finite counters are stacked, so that one kernel advances all of them.
        for m in bucket.members:
            state = optimizer.state[m.param]
            if "exp_avg" not in state:
                state.update(optimizer._init_block(tuple(m.param.shape), ADAM, bucket.group, bucket.dtype,
                                                   bucket.device))
        for name in ("exp_avg", "exp_avg_sq"):
            bucket.state[name] = [optimizer.state[m.param][name] for m in bucket.members]
        fresh = engine_entries(bucket.device)
    else:
        fresh = fresh_block_state(optimizer, bucket.shape, bucket.kind, bucket.group, bucket.dtype, bucket.device)
    for name in fresh:
        parts = [optimizer.state[m.param].get(m.prefix + name, fresh[name]) for m in bucket.members]
        stack = torch.stack(parts)
        bucket.state[name] = stack
        for j, m in enumerate(bucket.members):
            optimizer.state[m.param][m.prefix + name] = stack[j]
    if bucket.fused:  # the kernel takes the step counts as a list of (0-d) tensors
        bucket.state["steps"] = list(bucket.state["step"].unbind(0))

"""Planning a step: every block of every parameter, bucketed so that the arithmetic runs batched.

A *bucket* holds blocks of one param group that share (block shape, state dtype, device, kind, step
count); its state lives in stacked tensors (leading dim = block), and each parameter's entries in
``optimizer.state`` are views into those stacks. So a step is a few batched calls per bucket, while
``state_dict()`` still sees one flat dict of tensors per parameter, as the ``torch.optim`` ecosystem
(``torch.save``, distributed checkpointing: DCP) expects.

Per-parameter keys are the optimizer's own names (``"exp_avg"``, ``"factor0"``, …) for a parameter of
one block, and ``"block{b}.{name}"`` for a parameter cut into several blocks. Every block also has a
``step`` (float32, as ``torch.optim`` keeps it) and a ``nonfinite`` counter (int64).

The kind :data:`ADAM` is special: a bucket of Adam blocks whose parameters have the state's dtype is run
by torch's fused AdamW kernel over tensor lists, so it needs no common shape and no stacks.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..blocks import BlockLayout
from .distribute.collectives import local, row_range

__all__ = ["ADAM", "Member", "Bucket", "state_dtype", "block_prefix", "engine_entries"]

ADAM = "adam"


def state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state is float32 unless the parameter is float64 (then float64)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def block_prefix(block: int, blocks: int) -> str:
    return "" if blocks == 1 else f"block{block}."


@dataclass(eq=False)
class Member:
    """One block of one parameter.

    ``mode`` says what the block is cut from: ``"plain"`` (the parameter), ``"shard"`` (this process's
    shard of an FSDP2 ``DTensor``) or ``"full"`` (an FSDP2 ``DTensor`` gathered whole; one block).
    ``owner`` is the rank that computes the block's direction when directions are exchanged, else None.
    """

    param: Tensor
    layout: BlockLayout
    block: int
    prefix: str
    kind: Hashable = None
    mode: str = "plain"
    owner: int | None = None

    @property
    def fused(self) -> bool:
        """Run by torch's fused AdamW kernel (an Adam block of a parameter in its state dtype)."""
        return self.kind == ADAM and self.param.dtype == state_dtype(self.param) and self.mode != "full"

    def grad(self) -> Tensor:
        """The gradient this block is cut from, or this process's shard of it (the whole gradients of mode
        ``"full"`` are gathered a bucket at a time, by :func:`~precond.engine.distribute.gather_whole`)."""
        return local(self.param.grad)

    def data(self) -> Tensor:
        """The tensor a step writes: the parameter, or this process's shard of it."""
        return self.param.data if self.mode == "plain" else local(self.param).detach()

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
    # Exchanged buckets (work split between processes): ``local`` is the sub-bucket of the blocks this
    # process owns (it holds their method state; this bucket holds every block's step counters),
    # ``owned`` their positions (also as a list, ``owned_list``), ``counts[r]`` how many rank r owns,
    # ``order`` the permutation from rank-major to member order (None: the identity), ``positions[j]``
    # member j's place in rank-major order. Otherwise ``local`` is the bucket itself.
    exchanged: bool = False
    local: Bucket | None = None
    owned: Tensor | None = None
    owned_list: list[int] = field(default_factory=list)
    counts: list[int] = field(default_factory=list)
    order: Tensor | None = None
    positions: list[int] = field(default_factory=list)
    rows: tuple[int, int] | None = None  # mode "full": the flat range of a block this process's shard holds
    row_ranges: list[tuple[int, int]] = field(default_factory=list)  # mode "full": every rank's range
    micro: dict[str, Any] = field(default_factory=dict)  # microbatch accumulators of one step (bias_correction)

    @functools.cached_property
    def contiguous(self) -> bool:
        return all(m.data().is_contiguous() for m in self.members)

    @functools.cached_property
    def param_dtype(self) -> torch.dtype:
        """The dtype the members' weights stack to (the same in every process)."""
        return functools.reduce(torch.promote_types, (m.param.dtype for m in self.members))

    @property
    def block_numel(self) -> int:
        return math.prod(self.shape)

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
            state = optimizer.state[p]
            for m in optimizer._members(p, group):
                step = state.get(m.prefix + "step")
                calls = int(step.item()) if step is not None else 0  # a host read at planning time only
                shape = None if m.fused else tuple(m.layout.block_shapes[m.block])
                key = (gi, shape, state_dtype(p), m.data().device, m.kind, calls, m.owner is not None)
                keyed.setdefault(key, []).append(m)
    buckets = []
    for (gi, shape, dtype, device, kind, calls, exchanged), members in keyed.items():
        bucket = Bucket(groups[gi], gi, kind, shape, dtype, device, members, calls)
        if exchanged:
            _split(bucket, optimizer._topology.rank, optimizer._topology.world)
        else:
            bucket.local = bucket
        _attach_state(optimizer, bucket)
        # cached now: their first read takes cached_property's lock, which dynamo cannot trace (in a step
        # compiled from its first call, that graph break sent the whole step back to eager)
        _ = bucket.contiguous, bucket.param_dtype
        buckets.append(bucket)
    return buckets


def _split(bucket: Bucket, rank: int, world: int) -> None:
    """Fill in what an exchanged bucket needs: see :class:`Bucket`."""
    owners = [m.owner for m in bucket.members]
    bucket.exchanged = True
    bucket.counts = [owners.count(r) for r in range(world)]
    rank_major = sorted(range(len(owners)), key=lambda j: (owners[j], j))
    bucket.positions = [0] * len(owners)
    for position, j in enumerate(rank_major):
        bucket.positions[j] = position
    if rank_major != list(range(len(owners))):
        bucket.order = torch.tensor(bucket.positions, dtype=torch.long, device=bucket.device)
    owned = [j for j in range(len(owners)) if owners[j] == rank]
    bucket.owned = torch.tensor(owned, dtype=torch.long, device=bucket.device)
    bucket.owned_list = owned
    bucket.local = Bucket(bucket.group, bucket.group_index, bucket.kind, bucket.shape, bucket.dtype, bucket.device,
                          [bucket.members[j] for j in owned], bucket.calls)
    bucket.local.local = bucket.local
    if bucket.members[0].mode == "full":
        every = {tuple(_flat_rows(m.param, bucket.shape, r) for r in range(world)) for m in bucket.members}
        if len(every) != 1:
            raise RuntimeError(f"blocks of shape {bucket.shape} are sharded differently between parameters")
        bucket.row_ranges = list(every.pop())
        bucket.rows = bucket.row_ranges[rank]


def _flat_rows(param: Tensor, shape: tuple[int, ...], rank: int) -> tuple[int, int]:
    start, stop = row_range(param, rank)
    per_row = math.prod(shape) // param.shape[0]
    return start * per_row, stop * per_row


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
            if m.prefix + "exp_avg" not in state:
                fresh = optimizer._init_block(tuple(m.data().shape), ADAM, bucket.group, bucket.dtype, bucket.device)
                state.update({m.prefix + k: v for k, v in fresh.items()})
        for name in ("exp_avg", "exp_avg_sq"):
            bucket.state[name] = [optimizer.state[m.param][m.prefix + name] for m in bucket.members]
            for moment in bucket.state[name]:
                torch._dynamo.mark_static_address(moment)  # as the stacks below, for CUDA graphs
        _stack_state(optimizer, bucket, engine_entries(bucket.device))
        bucket.state["steps"] = list(bucket.state["step"].unbind(0))  # the kernel takes a list of 0-d tensors
        return
    method = optimizer._init_block(bucket.shape, bucket.kind, bucket.group, bucket.dtype, bucket.device)
    if bucket.local is bucket:
        _stack_state(optimizer, bucket, {**method, **engine_entries(bucket.device)})
    else:  # every block's counters here, the method state of the owned blocks in the sub-bucket
        _stack_state(optimizer, bucket, engine_entries(bucket.device))
        if bucket.local.members:
            _stack_state(optimizer, bucket.local, method)


def _stack_state(optimizer: Any, bucket: Bucket, fresh: dict[str, Tensor]) -> None:
    """``bucket.state[name]``: the stack of its members' saved ``name`` (``fresh`` where none is saved);
    each member's entry in ``optimizer.state`` becomes a view into the stack."""
    for name in fresh:
        parts = [optimizer.state[m.param].get(m.prefix + name, fresh[name]) for m in bucket.members]
        stack = torch.stack(parts)
        # A stack lives as long as its bucket: CUDA graphs (torch.compile's "reduce-overhead") may then read
        # and write it in place; inductor skips the capture of a graph that writes an input not marked so (a
        # new address re-records the graph; nothing is guarded, so no recompile). Plans are built eagerly
        # (``BlockEngine._build_plan``): dynamo refuses to trace this call.
        torch._dynamo.mark_static_address(stack)
        bucket.state[name] = stack
        for j, m in enumerate(bucket.members):
            optimizer.state[m.param][m.prefix + name] = stack[j]

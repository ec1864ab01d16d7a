"""Where a step's work is done: every block in this process (:class:`LocalWork`), or blocks dealt to owner
processes (:class:`SplitWork`, DDP and FSDP2). The engine's step calls these phases in order and branches on
nothing else:

(a) :meth:`Work.gather`: a bucket's gradients, as a stack, and the mask of the usable ones;
(b) :meth:`Work.directions`: the directions of the blocks this process owns;
(c) :meth:`Work.exchange`: whole matrices' directions to the processes holding their rows (FSDP2);
(d) :meth:`Work.apply`: weight decay and the update of the blocks this process owns;
(e) :meth:`Work.share`: the new weights of the blocks others own (DDP).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from ..batched import gradient_mask, gradient_rows
from .collectives import Topology, all_gather_blocks, assign_owners, gather_whole, scatter_rows

if TYPE_CHECKING:
    from ..plan import Bucket

__all__ = ["LocalWork", "SplitWork", "Work", "work_for"]

Contiguous = dict[Tensor, Tensor]  # non-contiguous parameters, updated through a contiguous copy


class LocalWork:
    """Every block is stepped where it lies: one process, or FSDP2 shards preconditioned in place."""

    def applies_at_once(self, bucket: Bucket) -> bool:
        """Whether nothing passes between (b) and (d) for ``bucket``: its direction is then applied as soon as
        it is made (and its gradients gathered only then), so that one bucket's direction and gradients are
        alive at a time rather than all of them (a step's peak memory)."""
        return True

    def __init__(self, topology: Topology) -> None:
        self.topology = topology

    def owners(self, engine: Any) -> dict[tuple[int, int], int] | None:
        """``(id(param), block) -> rank`` of the blocks stepped by one process for all; ``None``: none are."""
        return None

    def reset(self) -> None:
        """Forget what depends on the param groups (a group was added, a state loaded)."""

    def gather(self, engine: Any, bucket: Bucket, contiguous: Contiguous) -> tuple[Tensor, Tensor]:
        # one reduction over the stack: a multi-tensor norm costs the host ~10× more
        grads = torch.stack([m.view(m.grad().contiguous()) for m in bucket.members])
        ok = gradient_rows(grads, bucket.dtype)
        return engine._prepared(bucket, grads, ok, contiguous), ok

    def directions(self, engine: Any, bucket: Bucket, grads: Tensor, ok: Tensor) -> Tensor | None:
        return engine._bucket_directions(bucket, grads, ok)

    def exchange(self, buckets: list[Bucket], directions: dict[int, Tensor | None]) -> None:
        pass

    def apply(self, engine: Any, index: int, bucket: Bucket, direction: Tensor, ok: Tensor,
              contiguous: Contiguous) -> Tensor:
        """The mask of the blocks updated (of every block, once :meth:`share` has run)."""
        return engine._apply(bucket, direction, ok, contiguous)

    def share(self, engine: Any, buckets: list[Bucket], contiguous: Contiguous) -> list[tuple[int, Tensor]]:
        """``(bucket index, applied mask in member order)`` of the buckets whose weights others updated."""
        return []


Work = LocalWork  # the interface; SplitWork overrides every phase that differs


class SplitWork(LocalWork):
    """DDP (``distributed=``) and FSDP2 (DTensor parameters): see :mod:`precond.engine.distribute`."""

    def applies_at_once(self, bucket: Bucket) -> bool:
        """Except whole matrices from FSDP2 shards: their gathers and (c)'s exchange are collectives."""
        return bucket.rows is None

    def __init__(self, topology: Topology) -> None:
        super().__init__(topology)
        self._owners: dict[tuple[int, int], int] | None = None
        self._replicas: list[tuple[int, Tensor, Tensor]] = []  # (bucket, its owned blocks' new weights, applied)

    def owners(self, engine: Any) -> dict[tuple[int, int], int]:
        """Every exchanged block's owner (not fused, not cut from a shard), of every parameter, gradient or not,
        by :func:`~precond.engine.distribute.assign_owners`: the same in every process."""
        if self._owners is None:
            exchanged = [(m, group) for group in engine.param_groups for p in group["params"]
                         for m in engine._blocks_of(p, group) if m.mode != "shard" and not m.fused]
            costs = [engine._block_cost(tuple(m.layout.block_shapes[m.block]), m.kind, group)
                     for m, group in exchanged]
            owners = assign_owners(costs, self.topology.world)
            self._owners = {(id(m.param), m.block): owner for (m, _), owner in zip(exchanged, owners)}
        return self._owners

    def reset(self) -> None:
        self._owners = None

    def gather(self, engine: Any, bucket: Bucket, contiguous: Contiguous) -> tuple[Tensor, Tensor]:
        """Of the owned blocks only when exchanged; every block's mask is kept."""
        if bucket.rows is not None:  # whole matrices from FSDP2 shards (one block each): one all_gather
            whole = gather_whole(self.topology, [m.param.grad for m in bucket.members])
            stack = whole.reshape(len(bucket), *bucket.shape)  # the block's shape (Muon: the matrix view)
            ok = gradient_rows(stack, bucket.dtype)
            grads, kept_ok = stack.index_select(0, bucket.owned), ok.index_select(0, bucket.owned)
            if engine._weight_decay_mode(bucket.group) == "l2" and engine._rate(bucket, bucket.group)[1] != 0.0:
                raise NotImplementedError("L2 weight decay on whole matrices gathered from FSDP2 shards")
        elif bucket.exchanged:  # DDP: a process steps only the blocks it owns
            views = [m.view(m.grad().contiguous()) for m in bucket.members]
            ok = gradient_mask(views, bucket.dtype)
            kept, kept_ok = [views[j] for j in bucket.owned_list], ok.index_select(0, bucket.owned)
            if not kept:
                return views[0].new_empty((0, *bucket.shape), dtype=bucket.dtype), ok
            grads = torch.stack(kept)
        else:
            return super().gather(engine, bucket, contiguous)
        return engine._prepared(bucket, grads, kept_ok, contiguous), ok

    def directions(self, engine: Any, bucket: Bucket, grads: Tensor, ok: Tensor) -> Tensor | None:
        sub = bucket.local
        if sub is bucket:
            return super().directions(engine, bucket, grads, ok)
        makes_update = engine._makes_update(bucket)
        if not sub.members:
            return grads.new_empty((0, *bucket.shape), dtype=engine._direction_dtype(bucket)) if makes_update else None
        sub.calls = bucket.calls
        sub.state["step"] = bucket.state["step"].index_select(0, bucket.owned)
        ok = ok.index_select(0, bucket.owned)  # the gradients are the owned blocks' already
        direction = engine._bucket_directions(sub, grads, ok)
        # branched, not compared: traced, ``makes_update`` is a symbolic bool (``calls > 1``), and dynamo 2.13
        # fails inside sympy comparing it with a Python bool, where it evaluates it in an ``if`` fine
        if (direction is None) if makes_update else (direction is not None):
            raise RuntimeError(f"{type(engine).__name__}._makes_update disagrees with _directions")
        return None if direction is None else direction.to(engine._direction_dtype(bucket))

    def exchange(self, buckets: list[Bucket], directions: dict[int, Tensor | None]) -> None:
        """Every process gets the rows it holds of every whole matrix's direction (``[B, its flat range]``)."""
        pending = [i for i, b in enumerate(buckets) if b.rows is not None and directions.get(i) is not None]
        if pending:
            mine = scatter_rows(self.topology, [(buckets[i], directions[i]) for i in pending])
            for i, stack in zip(pending, mine):
                order = buckets[i].order
                directions[i] = stack if order is None else stack.index_select(0, order)

    def apply(self, engine: Any, index: int, bucket: Bucket, direction: Tensor, ok: Tensor,
              contiguous: Contiguous) -> Tensor:
        if bucket.rows is not None:  # this process's rows of each whole matrix's direction (phase c)
            direction = direction.reshape(len(bucket), *bucket.members[0].data().shape)
        if not bucket.exchanged or bucket.rows is not None:
            return super().apply(engine, index, bucket, direction, ok, contiguous)
        sub = bucket.local  # DDP: the owned blocks' update; their new weights go out at share()
        if not sub.members:
            weights, done = direction.new_empty((0, *bucket.shape), dtype=bucket.param_dtype), ok.new_empty(0)
        else:
            done = engine._apply(sub, direction, ok.index_select(0, bucket.owned), contiguous, may_raise=False)
            weights = engine._param_stack(sub, contiguous).to(bucket.param_dtype)
        self._replicas.append((index, weights, done))
        return ok

    def share(self, engine: Any, buckets: list[Bucket], contiguous: Contiguous) -> list[tuple[int, Tensor]]:
        """One ``all_gather`` hands every process the new weights of the blocks others own (written into its
        parameters) and every block's applied mask, so that all replicas stay identical. Exchanging weights
        rather than directions splits the update itself between processes too; it sends as many elements."""
        replicas, self._replicas = self._replicas, []
        if not replicas:
            return []
        pieces = []
        for i, weights, done in replicas:
            pieces += [(buckets[i], weights), (buckets[i], done.to(weights.dtype))]
        received = all_gather_blocks(self.topology, pieces)
        out = []
        for k, (i, _, _) in enumerate(replicas):
            bucket, weights, done = buckets[i], received[2 * k], received[2 * k + 1]
            blocks = engine._param_blocks(bucket, contiguous)
            others = [j for j, m in enumerate(bucket.members) if m.owner != self.topology.rank]
            if others:
                torch._foreach_copy_([blocks[j] for j in others], [weights[bucket.positions[j]] for j in others])
            done = done > 0.5
            out.append((i, done if bucket.order is None else done.index_select(0, bucket.order)))
        return out


def work_for(topology: Topology) -> LocalWork:
    """The :class:`Work` of ``topology``: split between processes or not."""
    return SplitWork(topology) if topology.splits_work else LocalWork(topology)

"""The collectives the engine runs across processes, and the set-up (:class:`Topology`) they run in."""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Topology", "resolve_topology", "assign_owners", "local", "row_range", "all_gather_blocks", "gather_whole",
           "scatter_rows"]


def _load_dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # a torch built without distributed support
        return None
    return DTensor


# Looked up once: is_dtensor is asked for every block of every step, and the import machinery is not free (a
# module constant, where functools.cache would make torch.compile warn on every compiled step).
_DTENSOR = _load_dtensor_type()


def is_dtensor(t: Any) -> bool:
    return _DTENSOR is not None and isinstance(t, _DTENSOR)


def local(t: Tensor) -> Tensor:
    """The local part of a ``DTensor`` (a view sharing its storage), or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t


@dataclass
class Topology:
    """The processes an optimizer runs across (one process: ``group=None``, rank 0 of 1)."""

    group: Any = None
    rank: int = 0
    world: int = 1
    fsdp: bool = False  # the parameters are DTensors
    comm_seconds: float = 0.0  # time spent in collectives, counted only while ``timed`` (adds device syncs)
    timed: bool = False
    _clock: list = field(default_factory=list, repr=False)

    @property
    def splits_work(self) -> bool:
        """Blocks get owners and directions are exchanged (also in a group of one, which runs the same path)."""
        return self.group is not None

    def start(self, device: torch.device) -> None:
        if self.timed:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self._clock.append(time.perf_counter())

    def stop(self, device: torch.device) -> None:
        if self.timed:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            self.comm_seconds += time.perf_counter() - self._clock.pop()


def resolve_topology(params: Sequence[Tensor], distributed: Any) -> Topology:
    """The :class:`Topology` for ``distributed`` (``None``, ``"ddp"`` or a process group) and ``params``."""
    dtensors = [p for p in params if is_dtensor(p)]
    if dtensors:
        if distributed is not None:
            raise ValueError(f"Invalid distributed: {distributed!r} (parameters sharded by FSDP2 are DTensors and "
                             "are handled without it; leave distributed=None)")
        if len(dtensors) != len(params):
            raise ValueError("Invalid params: a mix of DTensor (FSDP2) and plain tensors")
        mesh = dtensors[0].device_mesh
        if mesh.ndim != 1 or any(p.device_mesh != mesh for p in dtensors):
            raise ValueError("Invalid params: FSDP2 parameters must share one 1-D device mesh (HSDP is not supported)")
        for p in dtensors:
            placement = p.placements[0]
            if not (placement.is_shard() and placement.dim == 0):
                raise ValueError(f"Invalid params: a DTensor placed as {p.placements} (only Shard(0), FSDP2's "
                                 "default, is supported)")
        group = mesh.get_group()
        return Topology(group, dist.get_rank(group), dist.get_world_size(group), fsdp=True)
    if distributed is None:
        return Topology()
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError(f"Invalid distributed: {distributed!r} (torch.distributed is not initialised: call "
                         "torch.distributed.init_process_group first)")
    if distributed == "ddp":
        group = dist.group.WORLD
    elif isinstance(distributed, dist.ProcessGroup):
        group = distributed
    else:
        raise ValueError(f"Invalid distributed: {distributed!r} (must be None, 'ddp' or a ProcessGroup)")
    return Topology(group, dist.get_rank(group), dist.get_world_size(group))


def assign_owners(costs: Sequence[float], world: int) -> list[int]:
    """The owner of each item: most expensive first, to the least loaded process (ties: lowest rank).

    Deterministic, so that every process computes the same assignment.
    """
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    loads = [(0.0, r) for r in range(world)]
    owners = [0] * len(costs)
    for i in order:
        load, rank = heapq.heappop(loads)
        owners[i] = rank
        heapq.heappush(loads, (load + costs[i], rank))
    return owners


def row_range(param: Tensor, rank: int | None = None) -> tuple[int, int]:
    """The rows ``[start, stop)`` of dim 0 that this process (or ``rank``) holds of a ``Shard(0)`` DTensor."""
    rows = param.shape[0]
    mesh = param.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank() if rank is None else rank
    chunk = -(-rows // world)  # torch.chunk's split, which FSDP2 uses
    start = min(rank * chunk, rows)
    return start, min(start + chunk, rows)


def gather_whole(topology: Topology, shards: list[Tensor]) -> Tensor:
    """The stack ``[B, *shape]`` of whole tensors from their ``Shard(0)`` DTensors (all of one shape), by one
    ``all_gather``: each process sends its rows of all of them, padded to ``torch.chunk``'s chunk."""
    shape = tuple(shards[0].shape)
    rows, world = shape[0], topology.world
    chunk = -(-rows // world)
    mine = torch.stack([local(t) for t in shards])  # [B, my rows, *rest]
    send = mine.new_zeros((len(shards), chunk, *shape[1:]))
    send[:, :mine.shape[1]] = mine
    received = send.new_empty((world, *send.shape))
    topology.start(send.device)
    _all_gather(received.view(-1), send.view(-1), group=topology.group)
    topology.stop(send.device)
    return received.transpose(0, 1).reshape(len(shards), world * chunk, *shape[1:])[:, :rows]


def scatter_rows(topology: Topology, pieces: list[tuple[Any, Tensor]]) -> list[Tensor]:
    """For whole matrices gathered from FSDP2 shards: every process receives, of every block's direction, the
    rows it holds, from the block's owner (each sends each process only that process's rows).

    ``pieces``: ``(bucket, stack [n, *shape] of this process's blocks)`` as for :func:`all_gather_blocks`;
    ``bucket.row_ranges[r]`` is the flat range ``[lo, hi)`` of a block that rank ``r`` holds. One
    ``all_to_all_single`` per dtype and device. Returns per bucket ``[B, hi - lo]`` for this process's range,
    in rank-major order.
    """
    out: list[Tensor | None] = [None] * len(pieces)
    by_kind: dict[tuple, list[int]] = {}
    for i, (bucket, piece) in enumerate(pieces):
        by_kind.setdefault((piece.dtype, piece.device), []).append(i)
    world, rank = topology.world, topology.rank
    for (dtype, device), indices in by_kind.items():
        parts, send_sizes = [], []
        for r in range(world):
            size = 0
            for i in indices:
                lo, hi = pieces[i][0].row_ranges[r]
                part = pieces[i][1].flatten(1)[:, lo:hi]
                parts.append(part.reshape(-1))
                size += part.numel()
            send_sizes.append(size)
        widths = {i: pieces[i][0].row_ranges[rank][1] - pieces[i][0].row_ranges[rank][0] for i in indices}
        recv_sizes = [sum(pieces[i][0].counts[s] * widths[i] for i in indices) for s in range(world)]
        send = torch.cat(parts) if parts else torch.empty(0, dtype=dtype, device=device)
        received = torch.empty(sum(recv_sizes), dtype=dtype, device=device)
        topology.start(device)
        dist.all_to_all_single(received, send, recv_sizes, send_sizes, group=topology.group)
        topology.stop(device)
        by_bucket: dict[int, list[Tensor]] = {i: [] for i in indices}
        offset = 0
        for s in range(world):  # the buffer holds source 0's blocks of every bucket, then source 1's, ...
            for i in indices:
                n = pieces[i][0].counts[s] * widths[i]
                by_bucket[i].append(received[offset:offset + n])
                offset += n
        for i in indices:
            out[i] = torch.cat(by_bucket[i]).view(len(pieces[i][0]), widths[i])
    return out  # type: ignore[return-value]


# torch 2.13 renamed all_gather_into_tensor (and deprecated the old name)
_all_gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)


def all_gather_blocks(topology: Topology, pieces: list[tuple[Any, Tensor]]) -> list[Tensor]:
    """Every bucket's full stack, in rank-major order, from the stacks of the blocks each process owns.

    ``pieces``: ``(bucket, stack of this process's blocks)``, for the same buckets in the same order and
    with the same per-block shape and dtype in every process (a process owning none of a bucket's blocks
    passes an empty stack). ``bucket.counts[r]`` is how many blocks rank ``r`` owns; a result's block of
    member ``j`` is at ``bucket.positions[j]`` (``index_select(0, bucket.order)`` puts them in member
    order). One ``all_gather_into_tensor`` per dtype and device; the buffers are padded to the longest rank.
    """
    out: list[Tensor | None] = [None] * len(pieces)
    by_kind: dict[tuple, list[int]] = {}
    for i, (bucket, piece) in enumerate(pieces):
        by_kind.setdefault((piece.dtype, piece.device), []).append(i)
    for (dtype, device), indices in by_kind.items():
        numels = {i: math.prod(pieces[i][1].shape[1:]) for i in indices}
        sizes = [sum(pieces[i][0].counts[r] * numels[i] for i in indices) for r in range(topology.world)]
        width = max(sizes)
        send = torch.zeros(width, dtype=dtype, device=device)
        flat = [pieces[i][1].reshape(-1) for i in indices]
        if flat:
            torch.cat(flat, out=send[:sizes[topology.rank]])
        received = torch.empty(topology.world * width, dtype=dtype, device=device)
        topology.start(device)
        _all_gather(received, send, group=topology.group)
        topology.stop(device)
        received = received.view(topology.world, width)
        offsets = [0] * topology.world
        for i in indices:
            bucket, piece = pieces[i]
            parts = []
            for r in range(topology.world):
                n = bucket.counts[r] * numels[i]
                parts.append(received[r, offsets[r]:offsets[r] + n])
                offsets[r] += n
            out[i] = torch.cat(parts).view(len(bucket), *piece.shape[1:])
    return out  # type: ignore[return-value]


def agree_any(topology: Topology, flag: bool, device: torch.device) -> bool:
    """``flag`` or'ed over the processes of ``topology`` (one single-number ``all_reduce``; in one process,
    ``flag`` itself): for host decisions every process must take alike, e.g. an extra backward pass."""
    if topology.group is None:
        return flag
    value = torch.tensor([int(flag)], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX, group=topology.group)
    return bool(value.item())

"""Running one optimizer across processes with ``torch.distributed``, behind one interface.

Two set-ups, chosen from the parameters and the ``distributed`` argument of every precond optimizer:

**DDP** (``distributed="ddp"`` or a process group; the model wrapped in
``torch.nn.parallel.DistributedDataParallel``, so every process holds the same gradients). Every block
that is not run by the fused AdamW kernel gets an *owner*: blocks are dealt, most expensive first, to the
process with the least work so far (the cost is :meth:`~precond.engine.core.BlockEngine._block_cost`,
``numel · Σ dims`` by default: factor updates and preconditioning scale as ``d²·n``). A process keeps the
preconditioner state of the blocks it owns only (its memory for it is about ``1/world``), stacks only their
gradients, computes their directions and updates their weights; one ``all_gather`` per dtype then hands
every process the new weights of every block (and whether each was updated), so that the replicas stay
identical. Sending weights rather than directions sends as many elements and splits the update too. The
step counters of all blocks are kept everywhere (they are a few bytes and decide the bucketing, which must
agree between processes). Ownership depends only on the parameters'
shapes and order, so it is the same in every process and after a restart; a checkpoint of owned blocks
(keys ``"block{b}.name"``) can therefore be loaded at another world size with ``torch.distributed.checkpoint``.

**FSDP2** (parameters are ``DTensor`` s sharded on dim 0 by ``torch.distributed.fsdp.fully_shard``; no
argument needed). Kronecker and elementwise methods cut each process's *local shard* into blocks and
precondition them there, with no communication (as Distributed Shampoo's FullyShard distributor does): the
preconditioner of a matrix split by rows into shards is block-diagonal over the shards, so it differs from
one process's unless the blocks fall on shard boundaries (``max_preconditioner_dim`` dividing the shard
rows). These states are per shard, under keys ``"shard{rank}of{world}.…"``, so resuming at another world
size fails with a missing-key error. Methods whose update needs the whole matrix (Muon's Newton–Schulz)
gather the full gradients (one ``all_gather`` per bucket of one shape), run each on an owner process as
under DDP, and send every process only the rows of each direction it holds (one ``all_to_all`` per dtype);
every process then applies its rows, so Muon under FSDP2 equals Muon in one process.

The step sees only a :class:`~precond.engine.distribute.work.Work` (``engine._work``): :class:`LocalWork` in
one process, :class:`SplitWork` under DDP and FSDP2. It gathers each bucket's gradients, computes the
directions of the blocks this process owns, exchanges whole-matrix directions and shares the new weights;
nothing outside this package calls ``torch.distributed``.
"""

from .collectives import (Topology, agree_any, all_gather_blocks, assign_owners, gather_whole, is_dtensor, local,
                          resolve_topology, row_range, scatter_rows)
from .work import LocalWork, SplitWork, Work, work_for

__all__ = ["LocalWork", "SplitWork", "Topology", "Work", "agree_any", "all_gather_blocks", "assign_owners",
           "gather_whole", "is_dtensor", "local", "resolve_topology", "row_range", "scatter_rows", "work_for"]

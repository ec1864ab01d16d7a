"""The one engine every precond optimizer runs on.

:class:`BlockEngine` is a ``torch.optim.Optimizer`` that owns what all methods share: param groups,
closures, cutting parameters into blocks, bucketing blocks for batched arithmetic (see
:mod:`~precond.engine.plan`), weight decay, the guard against non-finite gradients, statistics and
``state_dict`` handling (the last two in base classes of their own: :class:`~precond.engine.reports.EngineReports`
and :class:`~precond.engine.saved_state.StateLoading`). A public optimizer subclasses it and supplies the hooks
that say what its preconditioner keeps and how it turns a stack of gradients into a stack of search directions:

- ``_layout(param, group)``: the :class:`~precond.blocks.BlockLayout` of a parameter;
- ``_block_kind(layout, index, group)``: a hashable that separates blocks needing different arithmetic
  (e.g. which dims get a Kronecker factor); :data:`~precond.engine.plan.ADAM` selects the fused AdamW path;
- ``_init_block(shape, kind, group, dtype, device)``: the state of one block, a flat dict of tensors;
- ``_directions(bucket, grads, ok, group)``: the directions ``P`` of a bucket (``[B, *shape]``), or
  ``None`` when the method makes no update this step (SOAP's first step).

A step runs in five phases: (a) gather the gradients into buckets and flag blocks with non-finite
gradients, (b) compute the directions of the blocks this process owns, (c) exchange the directions of
whole matrices gathered from FSDP2 shards, (d) apply weight decay and ``W ← W - lr·P``, (e) under DDP,
exchange the new weights of the blocks each process owns (in one process (c) and (e) do nothing). Where (c)
has nothing to exchange, (a), (b) and (d) run a bucket at a time, so that one bucket's temporaries are alive
at once. How work
and state are split between processes (DDP, FSDP2) is described in :mod:`~precond.engine.distribute`, whose
``Work`` object runs the phases that differ; the step itself never branches on the set-up.
Nothing in a step that does not refresh a preconditioner waits for the device. A group with ``"tf32"`` set
computes its directions (spectral normalisation included) with TF32 (``True``) or three-pass TF32 (``"3x"``)
float32 matmuls on CUDA (:mod:`~precond.precision`; the global setting is restored afterwards; when every
group asks the same, it is set once around the step, outside what ``torch.compile`` traces); a group
with ``"spectral_normalize": True`` (offered by Shampoo, EShampoo and SOAP) rescales each direction block of
two or more dims to spectral norm ``sqrt(d_out/d_in)`` (:func:`~precond.linalg.spectral_normalize`) before
the rate multiplies it (``"transposed": True``: the blocks are stored ``(d_in, d_out)``, Hugging Face's
Conv1D); blocks cut from an FSDP2 shard are normalised as the pieces they are.

Non-finite gradients: a block whose gradient holds NaN/Inf, or whose norm passes
:func:`~precond.engine.batched.gradient_bound` (1.8e17 in float32, where its squares would overflow the
statistics), leaves its state (its step count included) and its parameter block unchanged, decided on the
device by a per-block mask, and is counted; the first time a parameter is hit a warning is logged, later hits
are only counted. A fused AdamW bucket (the parameters of one group, device and dtype) is skipped as a whole
on such a step, as torch's fused kernel takes one skip flag per call (the behaviour of
``torch.amp.GradScaler``); the offending blocks are counted.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Iterable
from typing import Any

import torch
from torch import Tensor

from ..blocks import BlockLayout
from ..linalg import spectral_normalize, tf32_matmuls
from ..validation import Rule, check_group, flag_rule
from .batched import UPDATE_BOUND, gradient_mask, per_block, refusal_factors
from .distribute import Topology, agree_any, local, resolve_topology, work_for
from .plan import Bucket, Member, block_prefix, build_buckets
from .reports import STATS_FIELDS, EngineReports
from .saved_state import StateLoading
from .skips import SkipCount

__all__ = ["BlockEngine", "WEIGHT_DECAY_MODES", "STATS_FIELDS"]


def _traced_adamw(params: list[Tensor], grads: list[Tensor], exp_avgs: list[Tensor], exp_avg_sqs: list[Tensor],
                  steps: Tensor, lr: float | Tensor, beta1: float, beta2: float, weight_decay: float,
                  eps: float, found_inf: Tensor) -> None:
    """``torch._fused_adamw_``'s update written with multi-tensor ops, for ``torch.compile`` to fuse: the
    step counts (one stack ``[B]``, already advanced) are read; ``found_inf`` (0 or 1) skips every update:
    each change is scaled by ``keep = 1 - found_inf`` and the gradients are zeroed first, so nothing
    non-finite enters.
    Scalars are computed in the state's dtype (float64 state: the bias corrections in float64, as the fused
    kernel does), not in the float32 of the counters."""
    dtype = exp_avgs[0].dtype
    keep = (1.0 - found_inf).to(dtype)
    # Unbound here rather than passed as the kernel's list of views: a compiled step whose inputs include views
    # of one mutated tensor has them merged on every call, ~4 ms of host time for GPT-2 small's 50 parameters.
    steps = steps.to(dtype).unbind(0)
    grads = [torch.where(found_inf.bool(), 0.0, g.to(m.dtype)) for g, m in zip(grads, exp_avgs)]
    torch._foreach_lerp_(exp_avgs, grads, keep * (1.0 - beta1))
    torch._foreach_mul_(exp_avg_sqs, 1.0 - keep * (1.0 - beta2))
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1.0 - beta2)  # zero gradients add nothing
    torch._foreach_mul_(params, 1.0 - keep * (lr * weight_decay))
    bias1 = [1.0 - beta1 ** t for t in steps]
    bias2 = [(1.0 - beta2 ** t).sqrt() for t in steps]
    denoms = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(exp_avg_sqs), bias2), eps)
    step_sizes = [(-keep * lr) / b for b in bias1]
    torch._foreach_addcdiv_(params, torch._foreach_mul(exp_avgs, step_sizes), denoms)


# "decoupled": W ← W - lr·(P + wd·W), the decay uses W before the step (AdamW, Distributed Shampoo).
# "decoupled_after": W ← W - lr·P, then W ← W - lr·wd·W (the reference SOAP's order).
# "l2": the gradient becomes G + wd·W before anything else sees it.
WEIGHT_DECAY_MODES = ("decoupled", "decoupled_after", "l2")


class BlockEngine(EngineReports, StateLoading, torch.optim.Optimizer):
    """Base class: see the module docstring. Not used directly."""

    # The hyper-parameters a param group may set, each with its check (see precond.validation.check_group).
    _group_rules: dict[str, Rule] = {}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], distributed: Any = None,
                 strict: bool = False) -> None:
        check_group(self._group_rules, defaults)
        flag_rule("strict", strict)
        if isinstance(params, torch.nn.Module):
            raise TypeError(f"{type(self).__name__}: params must be parameters or param groups, not a module: pass "
                            f"model.parameters() or precond.param_groups(model), got a {type(params).__name__}")
        super().__init__(params, defaults)
        self._distributed = distributed
        self._strict = strict
        self._step_tf32: bool | str | None = None  # the TF32 mode step() set for every group (None: per group)
        self._last_rates: list[Any] | None = None  # the groups' lr at the last step()
        self._rates_move = False  # whether a group's Python lr has changed between steps (a scheduler)
        self._topology: Topology = resolve_topology(self._all_params(), distributed)
        self._work = work_for(self._topology)
        self._plan_key: tuple | None = None
        self._buckets: list[Bucket] = []
        self._warned: set[int] = set()
        self._guard_noted: set[int] = set()
        self._guard_pending: list[tuple[str, tuple[int, ...], str, float]] = []
        self._skips = SkipCount(self._warn_new_nonfinite)

    # ----------------------------------------------------------------------------------- hooks
    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        raise NotImplementedError

    def _block_kind(self, layout: BlockLayout, index: int, group: dict[str, Any]) -> Hashable:
        return None

    def _init_block(self, shape: tuple[int, ...], kind: Hashable, group: dict[str, Any], dtype: torch.dtype,
                    device: torch.device | str) -> dict[str, Tensor]:
        raise NotImplementedError

    def _directions(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor | None:
        raise NotImplementedError

    def _weight_decay_mode(self, group: dict[str, Any]) -> str:
        return "decoupled"

    def _adam_hyper(self, group: dict[str, Any]) -> tuple[float, float, float]:
        """``(beta1, beta2, eps)`` of the blocks of kind :data:`ADAM` in ``group``."""
        beta1, beta2 = group["betas"]
        return beta1, beta2, group["eps"]

    def _rate(self, bucket: Bucket, group: dict[str, Any]) -> tuple[float | Tensor, float]:
        """``(lr, weight_decay)`` of ``bucket``'s blocks: the group's (Muon and ASGO give their AdamW members
        rates of their own)."""
        return group["lr"], group["weight_decay"]

    def _direction_scale(self, bucket: Bucket, group: dict[str, Any]) -> float:
        """A per-bucket factor on the learning rate (Muon's shape-dependent rate); 1 by default."""
        return 1.0

    def _makes_update(self, bucket: Bucket) -> bool:
        """Whether ``bucket``'s blocks get a direction this step (decided on the host, the same way in every
        process, so that a process owning none of its blocks knows too); SOAP's first step does not."""
        return True

    def _direction_dtype(self, bucket: Bucket) -> torch.dtype:
        """The dtype of ``bucket``'s directions (what processes exchange): the state dtype by default."""
        return bucket.dtype

    def _block_cost(self, shape: tuple[int, ...], kind: Hashable, group: dict[str, Any]) -> float:
        """The relative cost of a block's step, for dealing blocks to processes: ``numel · Σ dims`` (factor
        updates, preconditioning and Newton–Schulz all scale as ``d²·n``)."""
        return float(math.prod(shape) * sum(shape))

    def _whole_matrix(self, param: Tensor, group: dict[str, Any]) -> bool:
        """Whether the update of an FSDP2-sharded ``param`` needs the whole matrix (Muon); else the blocks
        are cut from each process's shard."""
        return False

    # ------------------------------------------------------------------------------ planning
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group as ``torch.optim.Optimizer`` does, checked first (a group that fails leaves the optimizer
        as it was). Where some groups name their parameters (``param_names``, as :func:`precond.param_groups`
        returns them) and others do not, the unnamed ones are named ``"group{g}.{i}"`` rather than refused."""
        if not isinstance(param_group, dict):
            raise TypeError(f"{type(self).__name__}: a param group must be a dict, got {type(param_group).__name__}")
        check_group(self._group_rules, {**self.defaults, **param_group}, f"param group {len(self.param_groups)}")
        params = param_group.get("params", [])
        param_group["params"] = [params] if isinstance(params, Tensor) else list(params)  # as torch does
        _refuse_complex(type(self).__name__, param_group, len(self.param_groups))
        named = [("param_names" in g) for g in self.param_groups]
        if any(named) or (named and "param_names" in param_group):
            param_group = _named(param_group, len(self.param_groups))
            for index, group in enumerate(self.param_groups):
                group.update(_named(group, index))
        super().add_param_group(param_group)
        self._plan_key = None
        if hasattr(self, "_work"):
            self._work.reset()
        if hasattr(self, "_topology"):  # a group added after construction: the same set-up must hold for it
            resolve_topology(self._all_params(), self._distributed)

    @property
    def _splits_work(self) -> bool:
        """Whether blocks are dealt to processes (DDP with ``distributed=``), each stepping its own."""
        return self._topology.splits_work

    def _agree_any(self, flag: bool) -> bool:
        """``flag`` or'ed over the processes that share this optimizer's work (itself in one process)."""
        return agree_any(self._topology, flag, self.param_groups[0]["params"][0].device)

    def _all_params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _members(self, param: Tensor, group: dict[str, Any]) -> list[Member]:
        """The blocks of ``param``, with their owners when directions are exchanged between processes."""
        members = self._blocks_of(param, group)
        owners = self._work.owners(self)
        if owners is not None:
            for m in members:
                m.owner = owners.get((id(param), m.block))
        return members

    def _blocks_of(self, param: Tensor, group: dict[str, Any]) -> list[Member]:
        """The blocks of ``param`` as this process cuts them (from its shard under FSDP2), without owners."""
        topology = self._topology
        mode = ("full" if self._whole_matrix(param, group) else "shard") if topology.fsdp else "plain"
        source = local(param) if mode == "shard" else param
        if source.numel() == 0:
            return []  # an FSDP2 shard with no rows
        layout = self._layout(source, group)
        n = len(layout.block_shapes)
        if mode == "full" and n != 1:
            raise RuntimeError(f"{type(self).__name__}: a whole-matrix parameter must be one block, got {n}")
        shard = f"shard{topology.rank}of{topology.world}." if mode == "shard" else ""
        return [Member(param, layout, b, shard + block_prefix(b, n), self._block_kind(layout, b, group), mode)
                for b in range(n)]

    def _plan(self) -> list[Bucket]:
        with_grad = []
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            with_grad.append(params)
        key = tuple(tuple(map(id, params)) for params in with_grad)
        if key != self._plan_key:
            self._build_plan(with_grad, key)
        return self._buckets

    # Run eagerly, even inside a step compiled from its first call (one graph break on the steps that plan):
    # the state is made here and marked as living at one address (``mark_static_address``, which dynamo
    # refuses to trace), so that every graph traced after it sees static state.
    @torch._dynamo.disable
    def _build_plan(self, with_grad: list[list[Tensor]], key: tuple) -> None:
        self._buckets = build_buckets(self, self.param_groups, with_grad)
        self._plan_key = key
        if self._buckets:
            self._skips.prepare(self._buckets[0].device)
        self._say_guard_notes()

    # ------------------------------------------------------------------------------- the step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        # The TF32 setting every group shares is set here, in an eager frame: dynamo cannot trace reading the
        # global flag, and a graph break inside the context manager made it skip each bucket's whole frame.
        modes = {group.get("tf32", False) for group in self.param_groups}
        self._step_tf32 = modes.pop() if len(modes) == 1 else None
        self._note_rates()
        if self._plan_key is None:  # planned before _step: a step compiled from its first call then traces whole
            self._plan()
        # A step whose refresh reads a flag on the host (eigh's failures, CholeskyQR's fallback) runs eagerly
        # whole, also when compiled: traced, each such read broke the step at every bucket, the pieces after
        # the breaks were traced again per bucket and per refresh (on torch 2.13 one of those re-traces failed
        # inside dynamo), and inductor declined to capture them as CUDA graphs. The other steps trace whole.
        host_work = any(not b.fused and self._host_work_next(b) for b in self._buckets or ())
        with tf32_matmuls(self._step_tf32 or False):
            (self._step_eagerly if host_work else self._step)()
        return loss

    def _host_work_next(self, bucket: Bucket) -> bool:
        """Whether the coming step reads a flag on the host for ``bucket`` (a refresh); none by default."""
        return False

    def _note_rates(self) -> None:
        """Whether the groups' Python rates move between steps (read on the host, in the eager frame; tensor
        rates are the caller's to move). Once they have, a compiled step reads its rate as a number inside the
        graph (:meth:`_apply`) rather than as a constant that each new rate would recompile."""
        rates = [group["lr"] for group in self.param_groups]
        last, self._last_rates = self._last_rates, rates
        if last is not None and not self._rates_move:
            self._rates_move = len(rates) != len(last) or any(
                not isinstance(a, Tensor) and not isinstance(b, Tensor) and a != b for a, b in zip(rates, last))

    # Compiled as a frame of its own, also inside a compiled function that calls ``opt.step()``: there the
    # optimizer is reached through a global, and dynamo specialises a global's integers (the step counters the
    # refresh schedules read), recompiling at every step until its limit. As the frame's argument, ``self``'s
    # counters turn dynamic after one re-trace, as they do under ``torch.compile(opt.step)``.
    step = torch._dynamo.disable(step, recursive=False)

    @torch.compiler.disable
    def _step_eagerly(self) -> None:
        self._step()

    @torch.no_grad()
    def _step(self) -> None:
        buckets, work = self._plan(), self._work
        contiguous: dict[Tensor, Tensor] = {}  # non-contiguous parameters are updated through a copy
        # Where each direction is applied as soon as it is made and no gradient must be vetted before the first
        # update (``strict``), a bucket's gradients are gathered only when its turn comes: the step then holds
        # one bucket's stack of gradients, direction and temporaries at a time (its peak memory).
        at_once = [not b.fused and work.applies_at_once(b) for b in buckets]
        gathered = [None if now and not self._strict else self._gather(b, contiguous)             # (a)
                    for b, now in zip(buckets, at_once)]
        if self._strict:
            for bucket, (_, ok) in zip(buckets, gathered):
                self._raise_if_any(bucket, ~ok, "its gradient is not finite (or its norm passes gradient_bound)")
        directions: dict[int, Tensor | None] = {}
        updated: dict[int, Tensor] = {}  # the blocks updated in (d), where that differs from the usable ones
        for i, bucket in enumerate(buckets):                                                   # (b)
            if bucket.fused:
                continue
            grads, ok = gathered[i] or self._gather(bucket, contiguous)
            gathered[i] = (None, ok)
            bucket.calls += 1
            bucket.state["step"].add_(ok.to(torch.float32))
            direction = work.directions(self, bucket, grads, ok)
            del grads
            if not at_once[i]:
                directions[i] = direction
            elif direction is not None:                                                        # (d) at once
                updated[i] = work.apply(self, i, bucket, direction, ok, contiguous)
            del direction
        work.exchange(buckets, directions)                                                     # (c)
        for i, (bucket, (grads, ok)) in enumerate(zip(buckets, gathered)):                     # (d)
            if bucket.fused:
                updated[i] = self._fused_adam(bucket, grads, ok, contiguous)
            elif directions.get(i) is not None:
                updated[i] = work.apply(self, i, bucket, directions[i], ok, contiguous)
        applied = [updated.get(i, ok) for i, (_, ok) in enumerate(gathered)]
        for i, done in work.share(self, buckets, contiguous):                                  # (e)
            if self._strict:
                self._raise_if_any(buckets[i], applied[i] & ~done, _UNSOUND)
            applied[i] = done
        for p, copy in contiguous.items():
            p.data.copy_(copy)
        self._skips.note(buckets, applied)

    def _bucket_directions(self, bucket: Bucket, grads: Tensor, ok: Tensor) -> Tensor | None:
        """(b) for the blocks of ``bucket`` (this process's, when the work is split): the method's directions,
        with the group's TF32 setting and spectral normalisation."""
        group = bucket.group
        mode = group.get("tf32", False)
        with contextlib.nullcontext() if mode == self._step_tf32 else tf32_matmuls(mode):  # set by step()
            direction = self._directions(bucket, grads, ok, group)
            if direction is not None and group.get("spectral_normalize", False) and len(bucket.shape) >= 2:
                direction = spectral_normalize(direction, transposed=group.get("transposed", False))
        return direction

    def _gather(self, bucket: Bucket, contiguous: dict[Tensor, Tensor]) -> tuple[Any, Tensor]:
        """The bucket's gradients (a stack in the state dtype, refused blocks zeroed, of the owned blocks only
        when exchanged; a list for a fused bucket) and the mask of every block whose gradient is usable
        (finite, within :func:`~precond.engine.batched.gradient_bound`)."""
        if bucket.fused:
            grads = [m.grad() for m in bucket.members]
            return grads, gradient_mask(grads, bucket.dtype)
        return self._work.gather(self, bucket, contiguous)

    def _prepared(self, bucket: Bucket, grads: Tensor, kept_ok: Tensor, contiguous: dict[Tensor, Tensor]) -> Tensor:
        """(a) for a stack of gathered gradients (of the blocks with mask ``kept_ok``): in the state dtype, with
        L2 weight decay added, refused blocks zeroed."""
        grads = grads.to(bucket.dtype)
        group = bucket.group
        weight_decay = self._rate(bucket, group)[1]
        if self._weight_decay_mode(group) == "l2" and weight_decay != 0.0:
            grads = grads + weight_decay * self._param_stack(bucket.local, contiguous).to(bucket.dtype)
        # Refused blocks are zero, so that statistics of the gradient can be updated in place (batched.ema_).
        grads.masked_fill_(per_block(~kept_ok, grads), 0.0)
        return grads

    def _param_blocks(self, bucket: Bucket, contiguous: dict[Tensor, Tensor]) -> list[Tensor]:
        # A whole-matrix bucket (rows) writes this process's rows of each parameter, its shard.
        if (bucket.fused and bucket.contiguous) or bucket.rows is not None:
            return [m.data() for m in bucket.members]
        blocks = []
        for m in bucket.members:
            data = m.data()
            if not data.is_contiguous():
                if m.param not in contiguous:
                    contiguous[m.param] = data.contiguous()
                data = contiguous[m.param]
            blocks.append(m.view(data))
        return blocks

    def _param_stack(self, bucket: Bucket, contiguous: dict[Tensor, Tensor]) -> Tensor:
        return torch.stack(self._param_blocks(bucket, contiguous))

    def _apply(self, bucket: Bucket, direction: Tensor, ok: Tensor, contiguous: dict[Tensor, Tensor],
               may_raise: bool = True) -> Tensor:
        """(d): weight decay and ``W ← W - lr·s·P`` on the blocks with ``ok`` and a sound update; the others
        stay as they are. Returns the mask of the blocks updated.

        ``s`` is the optimizer's per-bucket :meth:`_direction_scale`. Decoupled decay is applied as
        ``W ← W·(1 - lr·wd)`` before (``"decoupled"``) or after (``"decoupled_after"``) the update. An
        update is sound when it is finite and its RMS is at most :data:`UPDATE_BOUND` times
        ``max(RMS(W), 1)`` for the block: no step of any rate a model survives comes near that, so a block
        past it has diverged, and writing it would turn the weights into Inf or NaN.
        """
        group = bucket.group
        (lr, wd), mode = self._rate(bucket, group), self._weight_decay_mode(group)
        blocks = self._param_blocks(bucket, contiguous)
        # A large bucket is written where its blocks are, by multi-tensor kernels; a small one is stacked,
        # updated and copied back, which costs four passes over its weights more but fewer launches.
        weights = torch.stack(blocks) if direction.numel() < IN_PLACE_ELEMENTS else None
        dims = tuple(range(1, direction.dim()))
        weight_norms = (torch.stack(torch._foreach_norm(blocks)) if weights is None
                        else torch.linalg.vector_norm(weights, dim=dims))
        scale = self._direction_scale(bucket, group)
        sound = _sound_update(direction, weight_norms, lr, scale)
        if self._strict and may_raise:  # under DDP raised after the exchange, in every process alike
            self._raise_if_any(bucket, ok & ~sound, _UNSOUND)
        ok = ok & sound
        dtype = blocks[0].dtype
        decay = wd != 0.0 and mode != "l2"
        # A tensor lr (as torch allows) is used without reading it on the host. Under torch.compile a Python
        # lr that a scheduler moves goes the same way: as the ``alpha=`` of an add or a fill value it would be
        # specialised, and each new rate would recompile the step. A fixed one stays a constant, so that the
        # compiled step rounds as the eager one.
        as_tensor = isinstance(lr, Tensor) or (self._rates_move and torch.compiler.is_compiling())
        rate = lr.to(ok.device) if isinstance(lr, Tensor) else lr
        if decay:
            if as_tensor:
                factors = 1.0 - (rate * wd) * ok.to(dtype)
            else:
                factors = refusal_factors(1.0 - lr * wd, ok, dtype)

        def decay_() -> None:
            if weights is None:
                torch._foreach_mul_(blocks, list(factors.unbind(0)))
            else:
                weights.mul_(per_block(factors, weights))

        if decay and mode == "decoupled":
            decay_()
        direction = torch.where(per_block(ok, direction), direction, 0.0)
        if dtype in (torch.bfloat16, torch.float16):  # low-precision parameters take a rounded update
            direction = direction.to(dtype)
        if as_tensor:
            direction, alpha = direction * (rate * scale), -1.0
        else:
            alpha = -lr * scale
        if weights is None:
            torch._foreach_add_(blocks, list(direction.unbind(0)), alpha=alpha)
        else:
            weights.add_(direction, alpha=alpha)
        if decay and mode == "decoupled_after":
            decay_()
        if weights is not None:
            torch._foreach_copy_(blocks, list(weights.unbind(0)))
        return ok

    def decouples_weight_decay(self, group: dict[str, Any]) -> bool:
        """Whether ``group``'s weight decay is decoupled (``W ← W·(1 − lr·wd)``) rather than L2 (in the gradient)."""
        return self._weight_decay_mode(group) != "l2"

    def decoupled_decay(self) -> dict[Tensor, tuple[float | Tensor, float]]:
        """Per parameter, the ``(lr, weight_decay)`` of its decoupled decay ``W ← W·(1 − lr·wd)`` at the
        current groups' settings, as the last step's plan assigns them (Muon's and ASGO's AdamW members
        take the AdamW rate and decay); parameters decayed by L2 (in the gradient) are absent. For a wrapper
        that applies the decay elsewhere (:mod:`precond.averaging`)."""
        rates: dict[Tensor, tuple[float | Tensor, float]] = {}
        for bucket in self._buckets or []:
            if self.decouples_weight_decay(bucket.group):
                rate = self._rate(bucket, bucket.group)
                for member in bucket.members:
                    rates[member.param] = rate
        return rates

    def _fused_adam(self, bucket: Bucket, grads: list[Tensor], ok: Tensor,
                    contiguous: dict[Tensor, Tensor]) -> Tensor:
        """AdamW by torch's fused kernel; a non-finite gradient anywhere in the bucket skips the bucket, and so
        does a rate past :data:`UPDATE_BOUND` × ``max(RMS(W), 1)`` (an Adam step's RMS is about the rate).
        Returns the mask of the blocks whose step was not refused for a reason of their own."""
        group = bucket.group
        beta1, beta2, eps = self._adam_hyper(group)
        params = self._param_blocks(bucket, contiguous)
        lr, weight_decay = self._rate(bucket, group)
        if isinstance(lr, Tensor):
            lr = lr.to(bucket.device)
        elif lr > UPDATE_BOUND:  # only then can a step pass the bound: the weights' RMS is read
            rms = torch.stack([torch.linalg.vector_norm(p.float()) / math.sqrt(max(1, p.numel())) for p in params])
            too_big = lr > UPDATE_BOUND * rms.clamp(min=1.0)
            if self._strict:
                self._raise_if_any(bucket, too_big, f"its rate {lr:g} passes {UPDATE_BOUND:g}× max(RMS(W), 1)")
            ok = ok & ~too_big
        # The kernel reads the step and never advances it (torch's order); a skipped step is not counted.
        keep = ok.all().to(torch.float32)
        bucket.state["step"].add_(keep)
        found_inf = 1.0 - keep
        if torch.compiler.is_compiling():  # the fused kernel does not trace: the same arithmetic, for inductor
            _traced_adamw(params, grads, bucket.state["exp_avg"], bucket.state["exp_avg_sq"], bucket.state["step"],
                          lr, beta1, beta2, weight_decay, eps, found_inf)
        else:
            torch._fused_adamw_(params, grads, bucket.state["exp_avg"], bucket.state["exp_avg_sq"], [],
                                bucket.state["steps"], lr=lr, beta1=beta1, beta2=beta2,
                                weight_decay=weight_decay, eps=eps, amsgrad=False, maximize=False,
                                grad_scale=None, found_inf=found_inf)
        bucket.calls += 1
        return ok


# A bucket of at least this many elements is updated in place (BlockEngine._apply): four passes over its
# weights fewer, a launch or two per block more. 2²² float32 elements are 16 MB, 5 µs of an H100's bandwidth
# per pass, about what the extra launches cost the host.
IN_PLACE_ELEMENTS = 1 << 22
_UNSOUND = f"its update is not finite or its RMS exceeds {UPDATE_BOUND:g}× max(RMS(W), 1)"


def _sound_update(direction: Tensor, weight_norms: Tensor, lr: float | Tensor, scale: float) -> Tensor:
    """Per block: the update ``lr·scale·P`` is finite and within :data:`UPDATE_BOUND` (see ``_apply``);
    ``weight_norms`` holds each block's Frobenius norm.

    ``RMS(lr·s·P) ≤ B·max(RMS(W), 1)`` is tested as ``‖P‖·|lr·s|/B ≤ max(‖W‖, √n)``, with the right side
    clamped to float32's largest value, so that an infinite or NaN update fails the one comparison (NaN
    weights fail it too): five operators a bucket, where the host's launches are what a step costs."""
    numel = max(1, math.prod(direction.shape[1:]))
    # The norm in the direction's own dtype (accumulated in float32) and layout: a float32 copy of a bf16
    # stack, or a flattened copy of a transposed one (Muon's tall matrices), would cost two passes more.
    dims = tuple(range(1, direction.dim()))
    norms = torch.linalg.vector_norm(direction, dim=dims).float()
    if isinstance(lr, Tensor) or torch.compiler.is_compiling():
        # A tensor times the rate first: Python arithmetic on a scheduler's rate (``abs(lr·s)``, even ``lr·c``)
        # made torch 2.11's compiled step guard on its value, and so recompile at every new rate until
        # dynamo's limit sent it back to eager.
        rate = lr.to(norms.device) if isinstance(lr, Tensor) else lr
        step = (norms * rate).abs() * (abs(scale) / UPDATE_BOUND)
    else:
        step = norms * (abs(lr * scale) / UPDATE_BOUND)
    return step <= weight_norms.float().clamp(min=math.sqrt(numel), max=torch.finfo(torch.float32).max)


def _refuse_complex(optimizer: str, group: dict[str, Any], index: int) -> None:
    """Complex parameters are refused when their group is added, before any state exists: none of the matrix
    methods is defined on them here (torch's AdamW steps their real view; use it for such parameters)."""
    names = group.get("param_names")
    for i, p in enumerate(group["params"]):
        p = p[1] if isinstance(p, tuple) else p
        if isinstance(p, Tensor) and p.is_complex():
            name = repr(names[i]) if names else f"parameter {i}"
            raise ValueError(f"{optimizer}: {name} of param group {index} is complex ({p.dtype}), which precond "
                             "does not support; give it to torch.optim.AdamW (it steps the real view)")


def _named(group: dict[str, Any], index: int) -> dict[str, Any]:
    """``group`` with ``param_names``: its own, or ``"group{index}.{i}"``; parameters given as ``(name, tensor)``
    pairs (torch's other way to name them) are left to torch."""
    if "param_names" in group or any(isinstance(p, tuple) for p in group["params"]):
        return group
    return dict(group, param_names=[f"group{index}.{i}" for i in range(len(group["params"]))])

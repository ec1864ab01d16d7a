"""Shared by the matrix optimizers (Muon, ASGO): route each parameter to the matrix rule or to AdamW.

A parameter takes the matrix rule when its group says ``"matrix": True`` (``"use_muon"`` is accepted as
an alias), or, in groups that say nothing, when it has two or more dims. Weights of three or more dims
are treated as ``(fan_out, fan_in · kernel)`` matrices. Everything else (biases, norms, and whatever a
group marks ``"matrix": False``: embeddings and the output head, see :func:`precond.param_groups`) runs
AdamW.

Routing happens inside each group, so the optimizer's ``param_groups`` are the groups the user passed, one
to one (``OneCycleLR(max_lr=[...])`` takes one value per group passed). Rates:

- a group marked ``"matrix": False`` is AdamW's alone: its ``lr`` and ``weight_decay`` (default
  ``adamw_lr`` / ``adamw_weight_decay``) are AdamW's;
- in any other group, ``lr`` and ``weight_decay`` are the matrix rule's, and the group's AdamW members (its
  vectors) step at ``lr · adamw_lr_ratio`` with ``adamw_weight_decay``. ``adamw_lr_ratio`` is set when
  the group is added, from ``adamw_lr`` (the constructor's, or the group's own) over the group's ``lr``, so
  a scheduler that edits ``lr`` scales both rules alike.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Iterable
from typing import Any

import torch
from torch import Tensor

from .adamw import adam_directions, adam_state
from .blocks import BlockLayout
from .engine import ADAM, BlockEngine, Bucket
from .preconditioners import MatrixPreconditioner
from .validation import betas_rule, check_finite_nonneg, check_group, check_lr, check_positive, pair

__all__ = ["MatrixOptimizer", "is_matrix"]


def is_matrix(group: dict[str, Any], p: Tensor) -> bool:
    """Whether ``p`` takes the matrix rule in ``group``: its ``"matrix"`` flag, else two dims or more."""
    flag = group.get("matrix")
    return p.dim() >= 2 if flag is None else bool(flag)


def _route(group: dict[str, Any], adamw: dict[str, Any]) -> dict[str, Any]:
    """``group`` with its AdamW rates resolved (see the module docstring); what the group sets itself wins."""
    group = dict(group)
    if "use_muon" in group:
        group.setdefault("matrix", group.pop("use_muon"))
    adamw_lr = group.pop("adamw_lr", group.get("lr", adamw["lr"]))
    if group.get("matrix", None) is False:
        group.setdefault("lr", adamw_lr)
        group.setdefault("weight_decay", group.pop("adamw_weight_decay", adamw["weight_decay"]))
        return group
    group.setdefault("adamw_weight_decay", group.get("weight_decay", adamw["weight_decay"]))
    if "adamw_lr_ratio" not in group:
        lr = float(group.get("lr", adamw["matrix_lr"]))
        if lr == 0.0 and adamw_lr != 0.0:
            raise ValueError("Invalid lr: 0 in a group whose non-matrix parameters step at adamw_lr, kept as a "
                             "multiple of lr; give them a group of their own ({'params': ..., 'matrix': False})")
        group["adamw_lr_ratio"] = adamw_lr / lr if lr else 0.0
    return group


class MatrixOptimizer(BlockEngine):
    """Base of Muon and ASGO: the routing, the matrix view and the AdamW half; the matrices run the
    ``preconditioner`` component (:mod:`precond.preconditioners`)."""

    _group_rules = {"adamw_betas": betas_rule, "adamw_eps": check_positive,
                    "adamw_weight_decay": check_finite_nonneg, "adamw_lr_ratio": check_finite_nonneg}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, adamw_lr: float,
                 adamw_betas: tuple[float, float], adamw_eps: float, adamw_weight_decay: float,
                 preconditioner: MatrixPreconditioner, distributed: Any = None, strict: bool = False) -> None:
        self.preconditioner = preconditioner
        defaults = dict(defaults, adamw_betas=pair(adamw_betas), adamw_eps=adamw_eps)
        check_group(self._group_rules, defaults)  # the method's own arguments are named first
        check_lr(adamw_lr)
        check_finite_nonneg("adamw_weight_decay", adamw_weight_decay)
        self._adamw_defaults = dict(lr=adamw_lr, weight_decay=adamw_weight_decay, matrix_lr=defaults["lr"])
        super().__init__(params, dict(defaults, matrix=None), distributed=distributed, strict=strict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group, routed like the constructor's (see the module docstring): one group, whose matrices
        take the matrix rule and whose other parameters AdamW."""
        if not isinstance(param_group, dict):
            raise TypeError(f"{type(self).__name__}: a param group must be a dict, got {type(param_group).__name__}")
        # checked as given first, so that an error names the group (routing reads lr)
        check_group(self._group_rules, {**self.defaults, **param_group}, f"param group {len(self.param_groups)}")
        super().add_param_group(_route(param_group, self._adamw_defaults))

    def _rate(self, bucket: Bucket, group: dict[str, Any]) -> tuple[Any, float]:
        if bucket.kind != ADAM or group["matrix"] is False:
            return group["lr"], group["weight_decay"]
        return group["lr"] * group["adamw_lr_ratio"], group["adamw_weight_decay"]

    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        merge = "matrix" if is_matrix(group, param) else "none"
        return BlockLayout.build(tuple(param.shape), math.inf, merge, "identity")

    def _block_kind(self, layout: BlockLayout, index: int, group: dict[str, Any]) -> Hashable:
        if group["matrix"] is not False and len(layout.block_shapes[index]) == 2:
            return self.preconditioner.kind(layout.block_shapes[index], group)
        return ADAM

    def _init_block(self, shape, kind, group, dtype, device):
        if kind == ADAM:
            return adam_state(shape, dtype, device)
        return self.preconditioner.state(shape, kind, group, dtype, device)

    def _host_work_next(self, bucket: Bucket) -> bool:
        return bucket.kind != ADAM and self.preconditioner.host_work_next(bucket, bucket.group)

    def _directions(self, bucket, grads, ok, group):
        if bucket.kind == ADAM:
            return adam_directions(bucket, grads, ok, group["adamw_betas"], group["adamw_eps"])
        return self.preconditioner.direction(bucket, grads, ok, group)

    def _adam_hyper(self, group: dict[str, Any]) -> tuple[float, float, float]:
        beta1, beta2 = group["adamw_betas"]
        return beta1, beta2, group["adamw_eps"]

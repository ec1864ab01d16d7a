"""Shared by the matrix optimizers (Muon, ASGO): route each parameter to the matrix rule or to AdamW.

A parameter takes the matrix rule when its group says ``"matrix": True`` (``"use_muon"`` is accepted as
an alias), or, in groups that say nothing, when it has two or more dims. Weights of three or more dims
are treated as ``(fan_out, fan_in · kernel)`` matrices. Everything else (biases, norms, and whatever a
group marks ``"matrix": False``: embeddings and the output head, see :func:`precond.param_groups`) runs
AdamW. Hyper-parameters a group sets apply to all of its parameters; those it leaves out come from the
constructor (the matrix rule's arguments, or ``adamw_*`` for the AdamW half). Routing happens when a group
is added (by the constructor or ``add_param_group``), by splitting it in two, so an LR scheduler sees and
scales both halves.

A group that holds both kinds therefore becomes two, and a scheduler that takes one value per group
(``OneCycleLR(max_lr=[...])``, ``CyclicLR``) needs ``len(optimizer.param_groups)`` values. Groups that are
already of one kind, as :func:`precond.param_groups` returns them (``"matrix"`` set), stay one to one:
``Muon(precond.param_groups(model), ...)`` with ``OneCycleLR(max_lr=[matrix_lr, adamw_lr])``.
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
from .validation import betas_rule, check_finite_nonneg, check_group, check_lr, check_positive

__all__ = ["MatrixOptimizer", "split_groups"]


def _is_matrix(group: dict[str, Any], p: Tensor) -> bool:
    for key in ("matrix", "use_muon"):
        if key in group:
            return bool(group[key])
    return p.dim() >= 2


def split_groups(params: Iterable[Any], adamw: dict[str, Any]) -> list[dict[str, Any]]:
    """Each group becomes a matrix group and an AdamW group (empty halves dropped); the AdamW half
    takes ``adamw`` (its ``lr`` and ``weight_decay``) unless the group set them itself."""
    params = list(params)
    groups = params if params and isinstance(params[0], dict) else [{"params": params}]
    out = []
    for group in groups:
        members = list(group["params"]) if not isinstance(group["params"], Tensor) else [group["params"]]
        names = group.get("param_names")
        rest = {k: v for k, v in group.items() if k not in ("params", "param_names", "use_muon")}
        for want in (True, False):
            chosen = [i for i, p in enumerate(members) if _is_matrix(group, p) == want]
            if not chosen:
                continue
            half = dict(rest, params=[members[i] for i in chosen], matrix=want)
            if names is not None:
                half["param_names"] = [names[i] for i in chosen]
            if not want:  # what the group sets applies to all its parameters; the rest is adamw_*
                for k, v in adamw.items():
                    half.setdefault(k, v)
            out.append(half)
    return out


class MatrixOptimizer(BlockEngine):
    """Base of Muon and ASGO: the routing, the matrix view and the AdamW half."""

    _group_rules = {"adamw_betas": betas_rule, "adamw_eps": check_positive}

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any], *, adamw_lr: float,
                 adamw_betas: tuple[float, float], adamw_eps: float, adamw_weight_decay: float,
                 distributed: Any = None, strict: bool = False) -> None:
        defaults = dict(defaults, adamw_betas=tuple(adamw_betas), adamw_eps=adamw_eps)
        check_group(self._group_rules, defaults)  # the method's own arguments are named first
        check_lr(adamw_lr)
        check_finite_nonneg("adamw_weight_decay", adamw_weight_decay)
        adamw = dict(lr=adamw_lr, weight_decay=adamw_weight_decay)
        self._adamw_defaults = adamw
        super().__init__(params, defaults, distributed=distributed, strict=strict)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Adds a group, routed like the constructor's: its matrices and its other parameters become two
        groups (the AdamW half taking ``adamw_lr``/``adamw_weight_decay`` unless the group sets them)."""
        for half in split_groups([param_group], self._adamw_defaults):
            super().add_param_group(half)

    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        merge = "matrix" if group["matrix"] else "none"
        return BlockLayout.build(tuple(param.shape), math.inf, merge, "identity")

    def _block_kind(self, layout: BlockLayout, index: int, group: dict[str, Any]) -> Hashable:
        if group["matrix"] and len(layout.block_shapes[index]) == 2:
            return self._matrix_kind(layout.block_shapes[index], group)
        return ADAM

    def _init_block(self, shape, kind, group, dtype, device):
        if kind == ADAM:
            return adam_state(shape, dtype, device)
        return self._init_matrix(shape, kind, group, dtype, device)

    def _directions(self, bucket, grads, ok, group):
        if bucket.kind == ADAM:
            return adam_directions(bucket, grads, ok, group["adamw_betas"], group["adamw_eps"])
        return self._matrix_directions(bucket, grads, ok, group)

    def _adam_hyper(self, group: dict[str, Any]) -> tuple[float, float, float]:
        beta1, beta2 = group["adamw_betas"]
        return beta1, beta2, group["adamw_eps"]

    # ------------------------------------------------------------------ what Muon / ASGO supply
    def _matrix_kind(self, shape: tuple[int, ...], group: dict[str, Any]) -> Hashable:
        return "matrix"

    def _init_matrix(self, shape: tuple[int, ...], kind: Hashable, group: dict[str, Any], dtype: torch.dtype,
                     device: torch.device | str) -> dict[str, Tensor]:
        raise NotImplementedError

    def _matrix_directions(self, bucket: Bucket, grads: Tensor, ok: Tensor, group: dict[str, Any]) -> Tensor:
        raise NotImplementedError

"""The one engine every precond optimizer runs on.

:class:`BlockEngine` is a ``torch.optim.Optimizer`` that owns what all methods share: param groups,
closures, cutting parameters into blocks, the per-block step counters, weight decay, the guard against
non-finite gradients, statistics and ``state_dict`` handling. A public optimizer subclasses it and
supplies three hooks that say what its preconditioner keeps and how it turns a gradient into a
search direction:

- ``_layout(param, group)``: the :class:`~precond.blocks.BlockLayout` of a parameter;
- ``_init_block(block, layout, index, group)``: the state of one block (a dict of tensors and counters);
- ``_direction(state, grad, group)``: the search direction ``P`` of one block, or ``None``
  when the method makes no update this step (SOAP's first step).

The engine then applies ``W ← W - lr·P`` with the weight-decay rule of the group.
"""

from __future__ import annotations

import copy
import itertools
import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

from .blocks import BlockLayout

__all__ = ["BlockEngine", "WEIGHT_DECAY_MODES"]

logger = logging.getLogger(__name__)

# "decoupled": W ← W - lr·(P + wd·W), the decay uses W before the step (AdamW, Distributed Shampoo).
# "decoupled_after": W ← W - lr·P, then W ← W - lr·wd·W (the reference SOAP's order).
# "l2": the gradient becomes G + wd·W before anything else sees it.
WEIGHT_DECAY_MODES = ("decoupled", "decoupled_after", "l2")


def state_dtype(param: Tensor) -> torch.dtype:
    """Optimizer state is float32 unless the parameter is float64 (then float64)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


class BlockEngine(torch.optim.Optimizer):
    """Base class: see the module docstring. Not used directly."""

    def __init__(self, params: Iterable[Any], defaults: dict[str, Any]) -> None:
        super().__init__(params, defaults)

    # ----------------------------------------------------------------------------------- hooks
    def _layout(self, param: Tensor, group: dict[str, Any]) -> BlockLayout:
        raise NotImplementedError

    def _init_block(self, block: Tensor, layout: BlockLayout, index: int, group: dict[str, Any]) -> dict[str, Any]:
        raise NotImplementedError

    def _direction(self, state: dict[str, Any], grad: Tensor, group: dict[str, Any]) -> Tensor | None:
        raise NotImplementedError

    def _weight_decay_mode(self, group: dict[str, Any]) -> str:
        return "decoupled"

    # ------------------------------------------------------------------------------- the step
    def _fresh_blocks(self, p: Tensor, group: dict[str, Any]) -> list[dict[str, Any]]:
        """The initial state of each block of ``p``."""
        layout = self._layout(p, group)
        return [self._init_block(b, layout, i, group) for i, b in enumerate(layout.blocks(p.detach().contiguous()))]

    def _param_state(self, p: Tensor, group: dict[str, Any]) -> dict[str, Any]:
        state = self.state[p]
        if "blocks" not in state:
            state["blocks"] = self._fresh_blocks(p, group)
            state["nonfinite_skips"] = 0
        return state

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """Performs one optimization step; ``closure`` re-evaluates the model and returns the loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
                self._step_param(p, group)
        return loss

    def _step_param(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self._param_state(p, group)
        layout = self._layout(p, group)
        dtype = state_dtype(p)
        # Blocks are views; a non-contiguous parameter is updated through a contiguous copy.
        work = p.data if p.data.is_contiguous() else p.data.contiguous()
        grad = p.grad.detach().contiguous()
        all_finite = bool(torch.isfinite(grad).all())
        mode = self._weight_decay_mode(group)
        lr, wd = float(group["lr"]), group["weight_decay"]  # torch allows a tensor lr
        for block_state, w, g in zip(state["blocks"], layout.blocks(work), layout.blocks(grad)):
            if not all_finite and not bool(torch.isfinite(g).all()):
                # A non-finite gradient must never reach the statistics: skip the block, count it.
                state["nonfinite_skips"] += 1
                logger.warning("non-finite gradient in a block of shape %s: block skipped", tuple(g.shape))
                continue
            g = g.to(dtype)
            w_state = w.to(dtype)
            if mode == "l2" and wd != 0.0:
                g = g + wd * w_state
            direction = self._direction(block_state, g, group)
            if direction is None:
                continue
            if mode == "decoupled" and wd != 0.0:
                direction = direction + wd * w_state
            w.add_(direction.to(w.dtype), alpha=-lr)
            if mode == "decoupled_after" and wd != 0.0:
                w.add_(w, alpha=-lr * wd)
        if work is not p.data:
            p.data.copy_(work)

    # -------------------------------------------------------------------------- statistics
    def preconditioner_stats(self) -> dict[str, Any]:
        """Per-factor counters and guard counts, for people to read and benchmarks to report.

        Returns ``{"factors": [...], "nonfinite_skipped_blocks": int}``; each factor record holds
        ``group, param, block, factor, dim`` and the counters ``refreshes`` (recomputed), ``skipped``
        (kept by the adaptive criterion), ``qr_iterations`` and ``failures`` (kept the last good result).
        """
        factors: list[dict[str, Any]] = []
        skipped = 0
        for gi, group in enumerate(self.param_groups):
            for pi, p in enumerate(group["params"]):
                state = self.state.get(p, {})
                skipped += state.get("nonfinite_skips", 0)
                for bi, block in enumerate(state.get("blocks", [])):
                    for fi, counters in enumerate(block.get("factor_stats", [])):
                        if counters is None:
                            continue
                        factors.append({"group": gi, "param": pi, "block": bi, "factor": fi, **counters})
        return {"factors": factors, "nonfinite_skipped_blocks": skipped}

    # ---------------------------------------------------------------------------- state_dict
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Loads a state saved by :meth:`state_dict`, checking every tensor's shape first.

        Unlike the base class, tensors keep their saved dtype (float32 state of a bf16 parameter stays
        float32), and they are copied, so continuing from a checkpoint is bit-identical to not stopping.
        """
        saved = state_dict["state"]
        params = list(itertools.chain.from_iterable(g["params"] for g in self.param_groups))
        groups = list(itertools.chain.from_iterable([g] * len(g["params"]) for g in self.param_groups))
        for index, value in saved.items():
            if not isinstance(index, int) or not 0 <= index < len(params):
                raise ValueError(f"state_dict has state for parameter {index!r}, but the optimizer has {len(params)}")
            p, group = params[index], groups[index]
            _check_same_structure(value.get("blocks"), self._fresh_blocks(p, group), f"state[{index}]['blocks']",
                                  tuple(p.shape))
        super().load_state_dict(state_dict)
        for index, value in saved.items():
            self.state[params[index]] = _copy_to(value, params[index].device)


def _check_same_structure(got: Any, want: Any, path: str, param_shape: tuple[int, ...]) -> None:
    where = f"{path} (parameter of shape {param_shape})"
    if isinstance(want, Tensor):
        if not isinstance(got, Tensor):
            raise ValueError(f"{where}: expected a tensor of shape {tuple(want.shape)}, got {type(got).__name__}")
        if got.shape != want.shape:
            raise ValueError(f"{where}: saved shape {tuple(got.shape)} does not match expected {tuple(want.shape)}")
    elif isinstance(want, dict):
        if not isinstance(got, dict) or set(got) != set(want):
            raise ValueError(f"{where}: saved keys {sorted(got) if isinstance(got, dict) else got!r} "
                             f"do not match expected {sorted(want)}")
        for k in want:
            _check_same_structure(got[k], want[k], f"{path}[{k!r}]", param_shape)
    elif isinstance(want, (list, tuple)):
        if not isinstance(got, (list, tuple)) or len(got) != len(want):
            raise ValueError(f"{where}: saved length {len(got) if isinstance(got, (list, tuple)) else got!r} "
                             f"does not match expected {len(want)}")
        for i, (a, b) in enumerate(zip(got, want)):
            _check_same_structure(a, b, f"{path}[{i}]", param_shape)


def _copy_to(value: Any, device: torch.device) -> Any:
    if isinstance(value, Tensor):
        return value.detach().clone().to(device)
    if isinstance(value, dict):
        return {k: _copy_to(v, device) for k, v in value.items()}
    if isinstance(value, list):
        return [_copy_to(v, device) for v in value]
    if isinstance(value, tuple):
        return tuple(_copy_to(v, device) for v in value)
    return copy.deepcopy(value)
